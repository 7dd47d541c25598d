"""What one flush costs the gateway's process at 1,000 clients, by the way it writes: CPU time per round.

    .venv/bin/python bench/gateway_sendpath.py [--clients 1000] [--positions 500] [--rounds 40] [--repeat 2]

A websockets asyncio server holds ``--clients`` connections from one client process (raw asyncio
Protocols that count bytes). Each round sends one update of ``--positions`` positions (the benchmark's
shape, about 200 bytes each) to every connection, then waits until every write buffer is empty. Modes,
alternated ``--repeat`` times in one run so that their ratios share the machine's noise:

- ``send``: websockets' ``send`` from a task per client (the gateway before: a frame serialised per client);
- ``frames``: the update's frames built once and written to each transport (processor.gateway.frames);
- ``deflate``: the same, compressed once (permessage-deflate without context takeover).

Printed: user and system CPU of the server process per round, and the round's wall time (p50).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import multiprocessing as mp
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def _cpu() -> tuple[float, float]:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime, r.ru_stime


def _clients(port: int, n: int) -> None:
    class Counting(asyncio.Protocol):
        def connection_made(self, transport: Any) -> None:
            key = base64.b64encode(os.urandom(16)).decode()
            transport.write(f"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode())

        def data_received(self, data: bytes) -> None:
            pass

    async def main() -> None:
        loop = asyncio.get_running_loop()
        for _ in range(n):
            await loop.create_connection(Counting, "127.0.0.1", port)
        await asyncio.sleep(3600)

    asyncio.run(main())


def _payload(positions: int) -> bytes:
    import orjson

    from processor.gateway.protocol import subscription_frame

    body = [orjson.dumps({
        "device_id": f"35630704{d:07d}", "ts": f"2026-12-03T12:00:{d % 60:02d}.{d % 1000:03d}Z",
        "latitude": 54.0 + (d % 100) / 100 + d / 1e6, "longitude": 25.0 + (d // 100) / 100, "altitude": None,
        "angle": 90, "speed": 42.5, "satellites": 9, "attributes": {"239": 1, "240": 1, "66": 12801}})
        for d in range(positions)]
    return subscription_frame("map", "update", body)


async def _run(args: argparse.Namespace) -> None:
    from websockets.asyncio.server import serve

    from processor.gateway import frames

    conns: set[Any] = set()

    async def handler(ws: Any) -> None:
        conns.add(ws)
        await ws.wait_closed()

    async with serve(handler, "127.0.0.1", 0, compression=None, ping_interval=None) as server:
        port = next(iter(server.sockets)).getsockname()[1]
        clients = mp.get_context("spawn").Process(target=_clients, args=(port, args.clients), daemon=True)
        clients.start()
        while len(conns) < args.clients:
            await asyncio.sleep(0.1)
        await asyncio.sleep(1)
        payload = _payload(args.positions)
        print(f"{args.clients} connections, an update of {args.positions} positions ({len(payload):,} bytes; "
              f"{len(frames.deflated_message(payload, 15)[0]):,} compressed) per round, {args.rounds} rounds")
        for _ in range(args.repeat):
            for mode in ("send", "frames", "deflate"):
                await _mode(mode, conns, payload, args.rounds)
        clients.kill()


async def _mode(mode: str, conns: set[Any], payload: bytes, rounds: int) -> None:
    from processor.gateway import frames

    wake = {c: asyncio.Event() for c in conns}

    async def sender(c: Any) -> None:
        while True:
            await wake[c].wait()
            wake[c].clear()
            await c.send(payload, text=True)

    tasks = [asyncio.create_task(sender(c)) for c in conns] if mode == "send" else []
    walls = []
    (u0, s0) = _cpu()
    for _ in range(rounds):
        start = time.perf_counter()
        if mode == "send":
            for event in wake.values():
                event.set()
        else:
            message = frames.text_message(payload) if mode == "frames" else frames.deflated_message(payload, 15)
            for c in conns:
                for frame in message:
                    frames.write(c, frame)
        await asyncio.sleep(0)
        while any(e.is_set() for e in wake.values()) or any(frames.buffered(c) for c in conns):
            await asyncio.sleep(0.001)
        walls.append(time.perf_counter() - start)
        await asyncio.sleep(0.05)
    (u1, s1) = _cpu()
    for t in tasks:
        t.cancel()
    print(f"{mode:>8}: user {1000 * (u1 - u0) / rounds:5.1f} ms + system {1000 * (s1 - s0) / rounds:5.1f} ms CPU "
          f"per round; round wall p50 {1000 * sorted(walls)[len(walls) // 2]:.0f} ms; load average "
          f"{os.getloadavg()[0]:.2f}", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument("--positions", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--repeat", type=int, default=2)
    asyncio.run(_run(parser.parse_args()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
