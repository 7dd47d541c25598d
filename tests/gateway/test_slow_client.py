"""A client that never reads while 100,000 positions flow: closed after GATEWAY_SLOW_CLIENT_S (1013), the
gateway's memory stays within 50 MB of its start, and another client keeps receiving without a stall."""

from __future__ import annotations

import json
import socket
import statistics
import threading
import time

import pytest

from tests.gateway.conftest import masked, open_client, raw_client, subscribe, token

# The gateway reads positions only for its snapshot, and the snapshot's test runs on both backends;
# the rest is the WebSocket side, the same whatever table is behind it (and the suite stays under
# ten minutes: issue 12).
pytestmark = pytest.mark.backends("plain")

POSITIONS = 100_000
DEVICES = 1_000
RATE = 20_000  # positions per second
SLOW_S = 2
RSS_GROWTH_LIMIT_MB = 50


def never_reading_client(port: int, jwt: str) -> socket.socket:
    """A WebSocket client by hand with a 4 KiB receive buffer: handshake, subscribe, then never read again."""
    sock = raw_client(port, jwt)
    sock.sendall(masked(json.dumps({"type": "subscribe", "uid": "map"}).encode()))
    return sock


class Reader(threading.Thread):
    """A client that reads everything and notes, per update, when it came and how old its positions were."""

    def __init__(self, ws) -> None:
        super().__init__(daemon=True)
        self.ws = ws
        self.arrivals: list[float] = []
        self.latencies: list[float] = []
        self.latest: dict[str, str] = {}
        self.closed_code: int | None = None
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                message = json.loads(self.ws.recv(timeout=0.2))
            except TimeoutError:
                continue
            except Exception as exc:  # noqa: BLE001 - the test asserts it stayed open
                self.closed_code = getattr(getattr(exc, "rcvd", None), "code", -1)
                return
            now = time.time()
            self.arrivals.append(now)
            for p in message["positions"]:
                self.latest[p["device_id"]] = p["ts"]
                self.latencies.append(now - p["attributes"]["sent"])


def test_a_client_that_never_reads_is_closed_and_costs_no_memory(start_gateway, redis_client, keys):
    gw = start_gateway(GATEWAY_SLOW_CLIENT_S=str(SLOW_S))
    jwt = token()
    slow = never_reading_client(gw.port, jwt)
    fast = open_client(gw, auth=jwt)
    subscribe(fast, "map")
    reader = Reader(fast)
    reader.start()
    time.sleep(0.5)
    baseline = peak = gw.rss_mb()
    assert gw.metric("gateway_clients") == 2

    # 100,000 positions of 1,000 devices at 20,000/s; each carries its publish time.
    base_ms = int(time.time() * 1000)
    pipe = redis_client.pipeline(transaction=False)
    started = time.monotonic()
    last_ts: dict[str, int] = {}
    for i in range(POSITIONS):
        device = f"dev{i % DEVICES:04d}"
        ts = base_ms + i  # strictly increasing per device
        last_ts[device] = ts
        pipe.xadd(keys["stream"], {"payload": json.dumps({
            "device_id": device, "timestamp": ts, "latitude": 54 + (i % 997) / 1e4, "longitude": 25.0,
            "attributes": {"sent": time.time()}})})
        if i % 1000 == 999:
            pipe.execute()
            peak = max(peak, gw.rss_mb())
            ahead = (i + 1) / RATE - (time.monotonic() - started)
            if ahead > 0:
                time.sleep(ahead)
    pipe.execute()
    published_s = time.monotonic() - started

    expected = {d: time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ts // 1000)) + f".{ts % 1000:03d}Z"
                for d, ts in last_ts.items()}
    deadline = time.monotonic() + 30
    while (reader.latest != expected or gw.metric("gateway_slow_clients_closed_total") < 1) \
            and time.monotonic() < deadline:
        peak = max(peak, gw.rss_mb())
        time.sleep(0.2)
    reader.stop.set()
    reader.join(5)

    assert gw.metric("gateway_slow_clients_closed_total") == 1
    assert reader.closed_code is None, "the client that reads was closed"
    assert reader.latest == expected, "the client that reads missed final positions"
    assert peak - baseline <= RSS_GROWTH_LIMIT_MB, (baseline, peak)
    gaps = [b - a for a, b in zip(reader.arrivals, reader.arrivals[1:])]
    # Nothing the slow client does holds the other one up: no pause as long as the slow client's stall.
    assert max(gaps) < SLOW_S, max(gaps)
    assert gw.metric('gateway_positions_coalesced_total{where="slow_client"}') > 0
    # The slow client's socket ends: the close frame (1013) waits behind what it never read; then the TCP reset.
    slow.settimeout(10)
    try:
        while slow.recv(65536):
            pass
    except (ConnectionResetError, TimeoutError):
        pass
    slow.close()
    lat = sorted(reader.latencies)
    print(f"{POSITIONS:,} positions in {published_s:.1f}s; RSS {baseline:.1f} MB -> peak {peak:.1f} MB; "
          f"reading client: {len(reader.arrivals)} updates, max gap {max(gaps) * 1000:.0f} ms, latency p50 "
          f"{statistics.median(lat) * 1000:.0f} ms p99 {lat[int(len(lat) * 0.99)] * 1000:.0f} ms")
