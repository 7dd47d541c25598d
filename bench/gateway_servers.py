"""websockets' threading server against its asyncio server at 1,000 clients (issue 14: measure first).

    .venv/bin/python bench/gateway_servers.py [--clients 1000] [--seconds 15] [--sizes 2000,60000]

Both servers do what the gateway must do: one update frame, built once, sent every 100 ms to every
client, without a slow client ever blocking the others. So each client has its own sender with a
one-slot mailbox (latest wins): a thread per client for the threading server (its ``send`` blocks on
a full socket), a task per client for the asyncio server. The server runs in its own process;
clients run in two processes (asyncio, frames read as bytes, not parsed) and report, per frame,
receipt time minus the send time written at the frame's start. Figures: server CPU (user+system
from /proc), peak RSS (VmHWM), p50/p99 latency, frames received versus expected.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import statistics
import sys
import threading
import time
from typing import Any

FLUSH_S = 0.1
PORT_BASE = 18700


def _cpu_s(pid: int) -> float:
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _hwm_mb(pid: int) -> float:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def _frame(size: int) -> bytes:
    head = f'{{"t":{time.time():.6f},"pad":"'.encode()
    return head + b"x" * max(0, size - len(head) - 2) + b'"}'


# --- the threading server: a handler thread and a sender thread per client --------------------------

def threading_server(port: int, size: int, ready: Any) -> None:
    from websockets.sync.server import serve

    mailboxes: dict[Any, list[Any]] = {}
    lock = threading.Lock()

    def sender(conn: Any, box: list[Any], cond: threading.Condition) -> None:
        while True:
            with cond:
                while box[0] is None:
                    cond.wait()
                frame, box[0] = box[0], None
            if frame is StopIteration:
                return
            try:
                conn.send(frame)
            except Exception:  # noqa: BLE001 - the client went away
                return

    def handler(conn: Any) -> None:
        cond = threading.Condition()
        box: list[Any] = [None, cond]
        with lock:
            mailboxes[conn] = box
        t = threading.Thread(target=sender, args=(conn, box, cond), daemon=True)
        t.start()
        try:
            for _ in conn:
                pass
        finally:
            with lock:
                mailboxes.pop(conn, None)
            with cond:
                box[0] = StopIteration
                cond.notify()

    def broadcaster() -> None:
        while True:
            time.sleep(FLUSH_S)
            frame = _frame(size)
            with lock:
                boxes = list(mailboxes.values())
            for box in boxes:
                cond = box[1]
                with cond:
                    box[0] = frame
                    cond.notify()

    with serve(handler, "127.0.0.1", port, compression=None, max_size=65536) as server:
        threading.Thread(target=broadcaster, daemon=True).start()
        ready.set()
        server.serve_forever()


# --- the asyncio server: a sender task per client ---------------------------------------------------

def asyncio_server(port: int, size: int, ready: Any) -> None:
    from websockets.asyncio.server import serve

    class Client:
        __slots__ = ("conn", "frame", "event")

        def __init__(self, conn: Any) -> None:
            self.conn, self.frame, self.event = conn, None, asyncio.Event()

    clients: set[Client] = set()

    async def sender(c: Client) -> None:
        while True:
            await c.event.wait()
            c.event.clear()
            frame, c.frame = c.frame, None
            await c.conn.send(frame)

    async def handler(conn: Any) -> None:
        c = Client(conn)
        clients.add(c)
        task = asyncio.create_task(sender(c))
        try:
            async for _ in conn:
                pass
        finally:
            clients.discard(c)
            task.cancel()

    async def broadcaster() -> None:
        while True:
            await asyncio.sleep(FLUSH_S)
            frame = _frame(size)
            for c in clients:
                c.frame = frame
                c.event.set()

    async def main() -> None:
        async with serve(handler, "127.0.0.1", port, compression=None, max_size=65536):
            asyncio.create_task(broadcaster())
            ready.set()
            await asyncio.Future()

    asyncio.run(main())


# --- clients ----------------------------------------------------------------------------------------

def client_process(port: int, n: int, seconds: float, out: Any) -> None:
    from websockets.asyncio.client import connect

    latencies: list[float] = []
    frames = [0]

    async def one(stop_at: float) -> None:
        async with connect(f"ws://127.0.0.1:{port}/", compression=None, max_size=None,
                           open_timeout=60) as ws:
            while time.time() < stop_at:
                try:
                    data = await asyncio.wait_for(ws.recv(decode=False), timeout=max(0.01, stop_at - time.time()))
                except asyncio.TimeoutError:
                    break
                now = time.time()
                if now < stop_at - seconds:
                    continue  # still connecting: not measured
                sent = float(data[5:data.index(b",")])
                frames[0] += 1
                if frames[0] % 7 == 0:  # a sample is enough, and keeps the clients light
                    latencies.append(now - sent)

    async def main() -> None:
        connect_until = time.time() + 30
        stop_at = connect_until + seconds
        tasks = []
        for i in range(n):
            tasks.append(asyncio.create_task(one(stop_at)))
            if i % 50 == 49:
                await asyncio.sleep(0.05)
        results = await asyncio.gather(*tasks, return_exceptions=True)
        errors = [repr(r) for r in results if isinstance(r, BaseException)]
        out.put({"latencies": latencies, "frames": frames[0], "errors": errors[:3], "n_errors": len(errors),
                 "measured_from": connect_until, "measured_to": stop_at})

    asyncio.run(main())


def measure(kind: str, clients: int, size: int, seconds: float, port: int) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    ready, out = ctx.Event(), ctx.Queue()
    target = threading_server if kind == "threading" else asyncio_server
    server = ctx.Process(target=target, args=(port, size, ready), daemon=True)
    server.start()
    ready.wait(30)
    procs = [ctx.Process(target=client_process, args=(port, clients // 2, seconds, out)) for _ in range(2)]
    for p in procs:
        p.start()
    # Connections are opened during the first 30 s; the measurement starts after them.
    time.sleep(30)
    cpu0, t0 = _cpu_s(server.pid), time.perf_counter()
    results = [out.get(timeout=seconds + 120) for _ in procs]
    cpu1, t1 = _cpu_s(server.pid), time.perf_counter()
    threads = len(os.listdir(f"/proc/{server.pid}/task"))
    hwm = _hwm_mb(server.pid)
    for p in procs:
        p.join(30)
    server.kill()
    server.join()
    lat = sorted(x for r in results for x in r["latencies"])
    frames = sum(r["frames"] for r in results)
    expected = clients * seconds / FLUSH_S
    return {
        "server": kind, "clients": clients, "frame_bytes": size, "seconds": seconds,
        "server_cpu_cores": round((cpu1 - cpu0) / (t1 - t0), 3),
        "server_peak_rss_mb": round(hwm, 1), "server_threads": threads,
        "p50_ms": round(1000 * statistics.quantiles(lat, n=100)[49], 1) if lat else None,
        "p99_ms": round(1000 * statistics.quantiles(lat, n=100)[98], 1) if lat else None,
        "frames_received_share": round(frames / expected, 3),
        "client_errors": sum(r["n_errors"] for r in results),
        "error_sample": [e for r in results for e in r["errors"]][:2],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument("--seconds", type=float, default=15)
    parser.add_argument("--sizes", default="2000,60000", help="frame sizes in bytes, comma-separated")
    parser.add_argument("--servers", default="threading,asyncio")
    args = parser.parse_args(argv)
    rows = []
    port = PORT_BASE
    for size in (int(s) for s in args.sizes.split(",")):
        for kind in args.servers.split(","):
            port += 1
            row = measure(kind, args.clients, size, args.seconds, port)
            print(json.dumps(row), flush=True)
            rows.append(row)
    return 0


if __name__ == "__main__":
    sys.exit(main())
