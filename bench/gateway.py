"""The gateway's benchmark (issue 14): live positions to 1,000 WebSocket clients.

A real gateway process (``processor.py gateway``) on a fresh database and stream; a publisher process
adds 5,000 positions/s from 10,000 devices for 30 s (each position's timestamp is its publish time, so
receipt time minus ``ts`` is the entry-id time to receipt, within a millisecond); client processes
hold 1,000 WebSocket connections, authenticated with a token on the URL:

1. ``all``: every client subscribed to everything (one distinct subscription: one encoding a flush);
2. ``devices``: every client subscribed to 10 devices of its own (1,000 distinct subscriptions).

Per phase: p50/p99 of receipt minus ``ts`` over the positions of a sample of clients (every 50th in the
``all`` phase, every client in the other, parses every position of every message it gets; see "the
clients" below for how the others are counted), positions delivered per second (all clients), clients
dropped, the gateway's CPU (user+system from /proc over the publishing window, in cores) and the CPU it
waited for (schedstat: runnable, not running), the clients' CPU, its peak RSS (VmHWM), its own
``gateway_entry_to_send_seconds`` p99 and the load averages. Clients and publisher run on the same
machine as the gateway: on a small machine they compete with it. The clients offer permessage-deflate
as browsers do; ``--no-deflate`` measures clients that do not.

    .venv/bin/python bench/gateway.py [--quick] [--phase all|devices] [--no-deflate] [--out FILE]

Uses REDIS_URL and POSTGRES_URL (a maintenance database where CREATE DATABASE is allowed).
``bench/run.py`` runs it as its "gateway" section through :func:`section`.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import calendar
import hashlib
import json
import multiprocessing as mp
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
DEFAULT_POSTGRES_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
SECRET = "bench-secret-0123456789abcdef0123456789"
TARGETS = {"p99_ms": 250.0, "peak_rss_mb": 300.0, "cpu_cores": 1.0}
PHASES = ("all", "devices")


@dataclass(frozen=True)
class Scale:
    rate: int = 5_000
    devices: int = 10_000
    seconds: float = 30.0
    clients: int = 1_000
    devices_per_client: int = 10
    client_processes: int = 2
    # Clients that read every position's ts (latency) and count positions: every 50th in the "all" phase
    # (each gets all 5,000 positions/s), every client in the "devices" phase (5,000 positions/s in all).
    sample_every_all: int = 50
    sample_every_devices: int = 1
    # Time given to the client processes to start, connect and subscribe before publishing begins:
    # this much, plus a second for every 40 clients.
    connect_s: float = 5.0


FULL = Scale()
QUICK = Scale(rate=500, devices=1_000, seconds=3.0, clients=50, client_processes=1, sample_every_all=5,
              connect_s=2.0)


def log(message: str) -> None:
    print(f"[gateway bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _hwm_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def _runqueue_wait_s(pid: int) -> float:
    """Seconds the process's threads were runnable but waiting for a CPU (schedstat): CPU it wanted, not got."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            total += int((task / "schedstat").read_text().split()[1])
        except (OSError, IndexError, ValueError):
            pass
    return total / 1e9


def _machine_busy_cores(seconds: float = 1.0) -> float:
    """Cores busy (all processes) over ``seconds``: how noisy the shared machine is right now."""
    def busy() -> tuple[int, int]:
        values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        idle = values[3] + values[4]
        return sum(values) - idle, sum(values)

    b0, t0 = busy()
    time.sleep(seconds)
    b1, t1 = busy()
    return round((b1 - b0) / max(1, t1 - t0) * os.cpu_count(), 2)


# --- the publisher ------------------------------------------------------------------------------

def publisher(redis_url: str, stream: str, scale: Scale, start_at: float, out: Any) -> None:
    import redis

    client = redis.Redis.from_url(redis_url)
    tick = 0.05
    per_tick = max(1, int(scale.rate * tick))
    ids = [f"35630704{i:07d}" for i in range(scale.devices)]
    n, device = 0, 0
    while time.time() < start_at:
        time.sleep(0.005)
    end = start_at + scale.seconds
    next_at = start_at
    while time.time() < end:
        pipe = client.pipeline(transaction=False)
        now_ms = int(time.time() * 1000)
        for _ in range(per_tick):
            lat = 54.0 + (device % 100) / 100 + (n % 1000) / 1e6
            lon = 25.0 + (device // 100) / 100
            pipe.xadd(stream, {"payload": json.dumps({
                "device_id": ids[device], "timestamp": now_ms, "latitude": lat, "longitude": lon,
                "speed": 42.5, "angle": 90, "satellites": 9, "attributes": {"239": 1, "240": 1, "66": 12801}})})
            device = (device + 1) % scale.devices
            n += 1
        pipe.execute()
        next_at += tick
        delay = next_at - time.time()
        if delay > 0:
            time.sleep(delay)
    out.put({"published": n, "seconds": round(time.time() - start_at, 2)})


# --- the clients: a lean WebSocket harness ------------------------------------------------------
#
# 1,000 clients x ~10 updates/s x ~100 KB is ~1 GB/s of JSON on the gateway's own 2 cores. Clients built on
# websockets' client parse and queue every frame: three such processes wanted three cores and held 1.4 GB each,
# so they, not the gateway, were measured. These clients are asyncio Protocols: the handshake, the auth reply
# and the init are read whole; after that a frame is split by its header alone and its payload skipped without a
# copy, except at the sampled clients, which keep each update (inflate it when compressed) and read every
# position's "ts" (latency) and count its positions. The others' positions are counted from the sampled
# clients of their process: a message of the same length is the same message (all members of a group get the
# same bytes); one no sampled client got is counted at the sampled clients' bytes per position. Like a browser,
# a client offers permessage-deflate (unless --no-deflate). Control frames are honoured: a ping gets its pong,
# a close counts as a drop.

_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
_TS_KEY = b'"ts":"'
_SYNC_TAIL = b"\x00\x00\xff\xff"


def _latencies_ms(frame: bytes, now_ms: float, cache: dict[bytes, int]) -> list[float]:
    """Receipt minus ``ts`` of every position in an update (``ts`` is ``YYYY-MM-DDTHH:MM:SS.mmmZ``)."""
    out = []
    find = frame.find
    i = find(_TS_KEY)
    while i >= 0:
        second = frame[i + 6:i + 25]
        base = cache.get(second)
        if base is None:
            base = cache[second] = calendar.timegm(time.strptime(second.decode(), "%Y-%m-%dT%H:%M:%S")) * 1000
        out.append(now_ms - base - int(frame[i + 26:i + 29]))
        i = find(_TS_KEY, i + 30)
    return out


def _client_frame(opcode: int, payload: bytes) -> bytes:
    """A masked client-to-server frame (RFC 6455 5.3: a client masks every frame)."""
    n = len(payload)
    mask = os.urandom(4)
    length = bytes([0x80 | n]) if n < 126 else bytes([0x80 | 126]) + n.to_bytes(2, "big")
    masked = bytes(b ^ mask[i & 3] for i, b in enumerate(payload))
    return bytes([0x80 | opcode]) + length + mask + masked


class Tally:
    """What the clients of one process saw inside the measuring window."""

    def __init__(self, measure_from: float, stop_at: float) -> None:
        self.measure_from, self.stop_at = measure_from, stop_at
        self.frames = self.bytes = self.sampled_bytes = self.sampled_positions = 0
        self.positions_by_length: dict[int, int] = {}  # what the sampled clients found in a message that long
        self.other_lengths: dict[int, int] = {}  # the other clients' messages: length -> how many
        self.dropped = 0
        self.errors: list[str] = []
        self.latencies: list[float] = []
        self.per_client_bytes: list[int] = []

    def drop(self, why: str) -> None:
        self.dropped += 1
        if len(self.errors) < 3:
            self.errors.append(why[:200])


class LeanClient(asyncio.Protocol):
    """One WebSocket connection: handshake, auth reply, subscribe, init, then updates split by header only."""

    def __init__(self, *, request: bytes, key: bytes, subscribe: bytes, sample: bool, tally: Tally,
                 subscribed: Any) -> None:
        self.request, self.subscribe, self.sample, self.tally, self.subscribed = request, subscribe, sample, tally, \
            subscribed
        self.accept = base64.b64encode(hashlib.sha1(key + _GUID).digest())
        self.transport: asyncio.Transport | None = None
        self.stage = "handshake"  # then "auth", "init", "live"; "gone" after a close or the end
        self.buf = bytearray()  # the handshake's reply, then a frame header being read
        self.need = 0  # payload bytes of the current frame still to come
        self.control: bytearray | None = None  # the payload of a control frame being read
        self.control_op = 0
        self.message: bytearray | None = None  # the data message being kept (not kept: None)
        self.message_bytes = 0
        self.deflate = False  # permessage-deflate negotiated
        self.compressed = False  # the current message is
        self.fin = False
        self.bytes = 0
        self.cache: dict[bytes, int] = {}

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.transport.write(self.request)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.stage != "gone" and time.time() < self.tally.stop_at:
            self.tally.drop(f"connection lost in stage {self.stage}: {exc!r}")
        self.stage = "gone"

    def finish(self) -> None:
        if self.stage == "live":
            self.tally.per_client_bytes.append(self.bytes)
        elif self.stage != "gone":
            self.tally.drop(f"never subscribed (stage {self.stage})")
        self.stage = "gone"
        if self.transport is not None:
            self.transport.abort()

    def data_received(self, data: bytes) -> None:
        if self.stage == "handshake":
            self.buf += data
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head, data = bytes(self.buf[:end]), bytes(self.buf[end + 4:])
            self.buf.clear()
            if not head.startswith(b"HTTP/1.1 101") or self.accept not in head:
                self._fail(f"handshake refused: {head[:80]!r}")
                return
            self.deflate = b"permessage-deflate" in head.lower()
            self.stage = "auth"
        i, n = 0, len(data)
        while i < n and self.stage != "gone":
            if self.need:
                take = min(self.need, n - i)
                if self.control is not None:
                    self.control += data[i:i + take]
                elif self.message is not None:
                    self.message += data[i:i + take]
                self.need -= take
                i += take
                if not self.need:
                    self._frame_end()
                continue
            head = self.buf
            head.append(data[i])
            i += 1
            if len(head) < 2:
                continue
            ln = head[1] & 0x7F
            size = 2 if ln < 126 else 4 if ln == 126 else 10
            if len(head) < size:
                continue
            self._frame_start(head[0], ln if ln < 126 else int.from_bytes(head[2:size], "big"))
            head.clear()

    def _frame_start(self, b0: int, length: int) -> None:
        op = b0 & 0x0F
        if op >= 8:
            self.control, self.control_op = bytearray(), op
        else:
            self.fin = bool(b0 & 0x80)
            if op:  # a new message (0: its continuation)
                self.message_bytes = 0
                self.compressed = bool(b0 & 0x40)
                self.message = bytearray() if self.sample or self.stage != "live" else None
            self.message_bytes += length
        self.need = length
        if not length:
            self._frame_end()

    def _frame_end(self) -> None:
        if self.control is not None:
            payload, op, self.control = bytes(self.control), self.control_op, None
            if op == 9:  # ping: the gateway closes a connection that does not answer
                self.transport.write(_client_frame(10, payload))  # type: ignore[union-attr]
            elif op == 8:
                code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else None
                self._fail(f"closed by the gateway: {code} {payload[2:80]!r}")
            return
        if self.fin:
            message = bytes(self.message) if self.message is not None else None
            if message is not None and self.compressed:
                message = zlib.decompressobj(-15).decompress(message + _SYNC_TAIL)
            self._message_end(message)

    def _message_end(self, message: bytes | None) -> None:
        now = time.time()
        if self.stage == "live":
            t = self.tally
            if t.measure_from <= now < t.stop_at:
                t.frames += 1
                t.bytes += self.message_bytes
                self.bytes += self.message_bytes
                if message is not None:
                    lat = _latencies_ms(message, now * 1000, self.cache)
                    t.latencies.extend(lat)
                    t.sampled_positions += len(lat)
                    t.sampled_bytes += self.message_bytes
                    t.positions_by_length[self.message_bytes] = len(lat)
                else:
                    t.other_lengths[self.message_bytes] = t.other_lengths.get(self.message_bytes, 0) + 1
        elif self.stage == "auth":
            if message is None or b'"status":"ok"' not in message:
                self._fail(f"auth refused: {message!r:.100}")
                return
            self.transport.write(_client_frame(1, self.subscribe))  # type: ignore[union-attr]
            self.stage = "init"
        elif self.stage == "init" and message is not None and b'"event":"init"' in message:
            self.stage = "live"
            with self.subscribed.get_lock():
                self.subscribed.value += 1

    def _fail(self, why: str) -> None:
        if self.stage != "gone":
            self.tally.drop(why)
        self.stage = "gone"
        if self.transport is not None:
            self.transport.abort()


def client_process(port: int, path: str, subscriptions: list[dict[str, Any]], sampled: list[bool],
                   measure_from: float, stop_at: float, subscribed: Any, out: Any, deflate: bool = True) -> None:
    """Hold one lean connection per subscription until ``stop_at``; put this process's :class:`Tally` on ``out``."""
    tally = Tally(measure_from, stop_at)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        clients: list[LeanClient] = []
        for i, (sub, sample) in enumerate(zip(subscriptions, sampled)):
            key = base64.b64encode(os.urandom(16))
            request = (f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
                       f"Connection: Upgrade\r\nSec-WebSocket-Key: {key.decode()}\r\n"
                       + ("Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n" if deflate else "")
                       + "Sec-WebSocket-Version: 13\r\n\r\n").encode()
            client = LeanClient(request=request, key=key, subscribe=json.dumps({"type": "subscribe", **sub}).encode(),
                                sample=sample, tally=tally, subscribed=subscribed)
            try:
                await loop.create_connection(lambda c=client: c, "127.0.0.1", port)  # type: ignore[misc]
            except OSError as exc:
                tally.drop(f"connect: {exc!r}")
                continue
            clients.append(client)
            if i % 50 == 49:
                await asyncio.sleep(0.05)
        await asyncio.sleep(max(0.0, stop_at - time.time()))
        for client in clients:
            client.finish()

    asyncio.run(main())
    known = {n: c for n, c in tally.other_lengths.items() if n in tally.positions_by_length}
    out.put({"frames": tally.frames, "bytes": tally.bytes, "sampled_bytes": tally.sampled_bytes,
             "sampled_positions": tally.sampled_positions, "dropped": tally.dropped, "errors": tally.errors,
             "latencies": tally.latencies, "per_client_bytes": tally.per_client_bytes,
             "matched_positions": sum(tally.positions_by_length[n] * c for n, c in known.items()),
             "matched_messages": sum(known.values()), "matched_bytes": sum(n * c for n, c in known.items()),
             "other_messages": sum(tally.other_lengths.values())})


# --- one phase ----------------------------------------------------------------------------------

def _quantile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return round(values[min(len(values) - 1, int(q * len(values)))], 1)


def _scrape(port: int) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    out = {}
    for line in text.splitlines():
        if line.startswith("gateway_") and " " in line:
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def _histogram_quantile(samples: dict[str, float], name: str, q: float) -> float | None:
    buckets = sorted((float(k.split('le="')[1].split('"')[0]), v) for k, v in samples.items()
                     if k.startswith(name + "_bucket{"))
    if not buckets or buckets[-1][1] == 0:
        return None
    rank = q * buckets[-1][1]
    for le, count in buckets:
        if count >= rank:
            return le
    return None


def run_phase(name: str, gateway: subprocess.Popen[bytes], port: int, redis_url: str, stream: str,
              scale: Scale, deflate: bool = True) -> dict[str, Any]:
    from processor.gateway.auth import mint

    path = f"/ws?access_token={mint(SECRET, ttl_s=3600)}"
    if name == "all":
        subs = [{"uid": "map"} for _ in range(scale.clients)]
    else:
        ids = [f"35630704{i:07d}" for i in range(scale.devices)]
        k = scale.devices_per_client
        subs = [{"uid": "mine", "devices": [ids[(c * k + j) % scale.devices] for j in range(k)]}
                for c in range(scale.clients)]
    every = scale.sample_every_all if name == "all" else scale.sample_every_devices
    sampled = [i % every == 0 for i in range(scale.clients)]
    ctx = mp.get_context("spawn")
    out, subscribed = ctx.Queue(), ctx.Value("i", 0)
    connect_s = scale.connect_s + scale.clients / 40
    start_at = time.time() + connect_s
    stop_at = start_at + scale.seconds + 2.0
    per = -(-scale.clients // scale.client_processes)
    procs = [ctx.Process(target=client_process, args=(port, path, subs[i:i + per], sampled[i:i + per], start_at,
                                                      stop_at, subscribed, out, deflate))
             for i in range(0, scale.clients, per)]
    for p in procs:
        p.start()
    pub = ctx.Process(target=publisher, args=(redis_url, stream, scale, start_at, out))
    pub.start()
    while time.time() < start_at - 0.2:
        time.sleep(0.1)
    connected = subscribed.value
    before = _scrape(port)
    load_before = os.getloadavg()
    cpu0, wait0, t0 = _cpu_s(gateway.pid), _runqueue_wait_s(gateway.pid), time.perf_counter()
    clients_cpu0 = sum(_cpu_s(p.pid) for p in procs)
    pub.join(scale.seconds + 60)
    cpu1, wait1, t1 = _cpu_s(gateway.pid), _runqueue_wait_s(gateway.pid), time.perf_counter()
    clients_cpu1 = sum(_cpu_s(p.pid) for p in procs)
    load_after = os.getloadavg()
    results = [out.get(timeout=120) for _ in range(len(procs) + 1)]
    for p in procs:
        p.join(30)
    after = _scrape(port)
    published = next(r for r in results if "published" in r)
    stats = [r for r in results if "frames" in r]
    lat = [x for s in stats for x in s["latencies"]]
    # Counted at the sampled clients; the others' messages by their length (see the clients' comment), the
    # rest at the sampled clients' bytes per position.
    sampled_positions = sum(s["sampled_positions"] for s in stats)
    sampled_bytes = sum(s["sampled_bytes"] for s in stats)
    total_bytes = sum(s["bytes"] for s in stats)
    matched_positions = sum(s["matched_positions"] for s in stats)
    unmatched_bytes = total_bytes - sampled_bytes - sum(s["matched_bytes"] for s in stats)
    delivered = sampled_positions + matched_positions + unmatched_bytes * sampled_positions / max(1, sampled_bytes)
    other_messages = sum(s["other_messages"] for s in stats)
    per_client = sorted(b for s in stats for b in s["per_client_bytes"])
    hist = {k: after.get(k, 0) - before.get(k, 0) for k in after if k.startswith("gateway_entry_to_send_seconds")}
    return {
        "phase": name, "clients": scale.clients, "subscribed_before_start": connected,
        "distinct_subscriptions": after.get("gateway_subscription_groups"),
        "published": published["published"], "publish_seconds": published["seconds"],
        "published_per_s": round(published["published"] / published["seconds"]),
        "p50_ms": _quantile(lat, 0.5), "p99_ms": _quantile(lat, 0.99), "max_ms": _quantile(lat, 1.0),
        "latency_samples": len(lat),
        "delivered_per_s": round(delivered / scale.seconds),
        "delivered_mb_per_s": round(total_bytes / scale.seconds / 1e6, 1),
        "deflate_offered": deflate,
        "other_messages_matched": round(sum(s["matched_messages"] for s in stats) / other_messages, 4)
        if other_messages else None,
        "gateway_positions_sent_per_s": round((after.get("gateway_positions_sent_total", 0)
                                               - before.get("gateway_positions_sent_total", 0)) / scale.seconds),
        "gateway_bytes_sent_mb_per_s": round((after.get("gateway_bytes_sent_total", 0)
                                              - before.get("gateway_bytes_sent_total", 0)) / scale.seconds / 1e6, 1),
        "client_bytes_min_to_median": round(per_client[0] / max(1, per_client[len(per_client) // 2]), 3)
        if per_client else None,
        "sampled_clients": sum(sampled), "frames_received": sum(s["frames"] for s in stats),
        "expected_per_s": round(scale.rate * (scale.clients if name == "all"
                                              else scale.devices_per_client * scale.clients / scale.devices)),
        "dropped_clients": sum(s["dropped"] for s in stats),
        "slow_clients_closed": after.get("gateway_slow_clients_closed_total", 0)
        - before.get("gateway_slow_clients_closed_total", 0),
        "drop_errors": [e for s in stats for e in s["errors"]][:3],
        "gateway_cpu_cores": round((cpu1 - cpu0) / (t1 - t0), 3),
        "gateway_runqueue_wait_cores": round((wait1 - wait0) / (t1 - t0), 3),
        "clients_cpu_cores": round((clients_cpu1 - clients_cpu0) / (t1 - t0), 3),
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in load_after],
        "gateway_peak_rss_mb": round(_hwm_mb(gateway.pid), 1),
        "gateway_metric_p99_s": _histogram_quantile(hist, "gateway_entry_to_send_seconds", 0.99),
        "updates_encoded": after.get("gateway_updates_encoded_total", 0)
        - before.get("gateway_updates_encoded_total", 0),
    }


# --- the whole run --------------------------------------------------------------------------------

def _with_db(url: str, name: str) -> str:
    return urlunsplit(urlsplit(url)._replace(path="/" + name))


def _admin(url: str, sql: str) -> None:
    import psycopg2

    conn = psycopg2.connect(url)
    conn.autocommit = True
    try:
        conn.cursor().execute(sql)
    finally:
        conn.close()


def _start_gateway(redis_url: str, pg_url: str, stream: str, port: int, logfile: Any) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    env.update({"REDIS_URL": redis_url, "POSTGRES_URL": pg_url, "STREAM_KEY": stream, "GATEWAY_PORT": str(port),
                "GATEWAY_HOST": "127.0.0.1", "GATEWAY_TOKEN_SECRET": SECRET, "LOG_LEVEL": "warning",
                "LOG_FORMAT": "text"})
    proc = subprocess.Popen([sys.executable, str(ROOT / "processor.py"), "gateway"], env=env, stdout=logfile,
                            stderr=subprocess.STDOUT)
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            if urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2).status == 200:
                return proc
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("the gateway did not become ready")


def run(redis_url: str, admin_url: str, *, quick: bool = False,
        phases: tuple[str, ...] = PHASES, deflate: bool = True) -> dict[str, Any]:
    import redis

    from processor.core.db import schema_sql

    scale = QUICK if quick else FULL
    tag = uuid.uuid4().hex[:8]
    db, stream = f"bench_gw_{tag}", f"bench:gw:{tag}"
    _admin(admin_url, f'CREATE DATABASE "{db}"')
    pg_url = _with_db(admin_url, db)
    _admin(pg_url, schema_sql())
    results: dict[str, Any] = {"started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                               "scale": asdict(scale), "quick": quick, "targets": TARGETS, "deflate": deflate,
                               "machine_busy_cores_before": _machine_busy_cores(), "cores": os.cpu_count()}
    client = redis.Redis.from_url(redis_url)
    try:
        for phase in phases:
            port = free_port()
            with tempfile.NamedTemporaryFile("wb", prefix="gateway-bench-", suffix=".log", delete=False) as logf:
                gateway = _start_gateway(redis_url, pg_url, stream, port, logf)
                try:
                    log(f"{phase}: {scale.clients} clients, {scale.rate}/s from {scale.devices} devices, "
                        f"{scale.seconds:g} s")
                    results[phase] = run_phase(phase, gateway, port, redis_url, stream, scale, deflate)
                    log(f"{phase}: {_brief(results[phase])}")
                finally:
                    gateway.send_signal(signal.SIGTERM)
                    results[phase]["gateway_exit"] = gateway.wait(30) if phase in results else None
            client.delete(stream)
    finally:
        client.delete(stream)
        client.close()
        _admin(admin_url, f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')
    results["machine_busy_cores_after"] = _machine_busy_cores()
    results["verdict"] = {phase: {
        "p99_ms": results[phase]["p99_ms"] is not None and results[phase]["p99_ms"] <= TARGETS["p99_ms"],
        "no_client_dropped": results[phase]["dropped_clients"] == 0,
        "peak_rss_mb": results[phase]["gateway_peak_rss_mb"] <= TARGETS["peak_rss_mb"],
        "cpu_cores": results[phase]["gateway_cpu_cores"] <= TARGETS["cpu_cores"],
    } for phase in phases}
    return results


def _brief(r: dict[str, Any]) -> str:
    return (f"p50 {r['p50_ms']} ms p99 {r['p99_ms']} ms, delivered {r['delivered_per_s']:,}/s "
            f"(of {r['expected_per_s']:,}/s), dropped {r['dropped_clients']}, gateway {r['gateway_cpu_cores']} cores "
            f"{r['gateway_peak_rss_mb']} MB")


def table(results: dict[str, Any]) -> str:
    lines = ["gateway: phase    clients  p50 ms  p99 ms  delivered/s  expected/s    MB/s  dropped  CPU cores  "
             "waited  peak RSS MB  load avg"]
    for phase in (p for p in PHASES if p in results):
        r = results[phase]
        lines.append(f"gateway: {phase:<8} {r['clients']:>7}  {r['p50_ms']!s:>6}  {r['p99_ms']!s:>6}  "
                     f"{r['delivered_per_s']:>11,}  {r['expected_per_s']:>10,}  {r['delivered_mb_per_s']:>6}  "
                     f"{r['dropped_clients']:>7}  {r['gateway_cpu_cores']:>9}  {r['gateway_runqueue_wait_cores']:>6}  "
                     f"{r['gateway_peak_rss_mb']:>11}  {r['load_average_before'][0]}/{r['load_average_after'][0]}")
    lines.append(f"gateway: machine busy before/after: {results['machine_busy_cores_before']}/"
                 f"{results['machine_busy_cores_after']} of {results['cores']} cores; clients "
                 f"{'offer' if results.get('deflate', True) else 'do not offer'} permessage-deflate")
    return "\n".join(lines)


def section(redis_url: str, admin_url: str, quick: bool) -> dict[str, Any]:
    """The "gateway" section of bench/run.py."""
    results = run(redis_url, admin_url, quick=quick)
    print(table(results))
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="The gateway's benchmark (issue 14).")
    parser.add_argument("--quick", action="store_true", help="50 clients, 500 positions/s for 3 s")
    parser.add_argument("--phase", choices=PHASES, action="append",
                        help="run only this phase (repeatable; default: both)")
    parser.add_argument("--no-deflate", action="store_true",
                        help="clients do not offer permessage-deflate (they get uncompressed frames)")
    parser.add_argument("--out", default=str(ROOT / "bench" / "gateway_results.json"))
    parser.add_argument("--redis-url", default=os.environ.get("REDIS_URL", DEFAULT_REDIS_URL))
    parser.add_argument("--postgres-url", default=os.environ.get("POSTGRES_URL", DEFAULT_POSTGRES_URL))
    args = parser.parse_args(argv)
    results = run(args.redis_url, args.postgres_url, quick=args.quick, phases=tuple(args.phase or PHASES),
                  deflate=not args.no_deflate)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(table(results))
    log(f"results written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
