"""Observability against real servers (issue 4): /metrics, /healthz, /readyz, the heartbeat, the domain seam.

The dashboard, the alert rules and promtool on a synthetic exposition are in
test_dashboards.py; here every check reads a running service: its HTTP endpoint
(METRICS_PORT on a free port), its registry, its logs.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import socket
import subprocess
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families

from processor import __version__
from processor.core import httpserver
from processor.core import pipeline as pipeline_module
from processor.core.decode import Decoder
from processor.simulate import Fleet
from processor.core.metrics import E2E_BUCKETS, SIZE_BUCKETS, STATUSES, WAYS, WRITE_BUCKETS
from processor.core.types import DB_REJECTED, MAX_DELIVERIES, REASONS, Rejection, WriteStatus
from tests.helpers import (BASE_MS, InProcessService, ServiceProcess, config_for, dead_letters, free_port,
                           http_get, metric_value, payload, pending_count, publish, row_count, wait_until)

# Metrics, health and logs are the same whatever table is behind them: one backend, except the known
# input's exact counts (inserted, duplicate, failed), which the writer produces on each kind of table.
pytestmark = pytest.mark.backends("plain")

PIPELINE_LOGGER = "processor.core.pipeline"
MAX_PAYLOAD = 2048  # small, so that a too_large payload stays small too
DECODE_REASONS = tuple(r for r in REASONS if r not in (DB_REJECTED, MAX_DELIVERIES))

needs_promtool = pytest.mark.skipif(shutil.which("promtool") is None,
                                    reason="promtool is not installed (Debian package prometheus)")


# --- helpers ---------------------------------------------------------------------------------------------

def _rejects() -> dict[str, dict[bytes, bytes]]:
    """One stream entry (its fields) per decode rejection reason; device ids 'obs-bad-*' where there is one."""
    def doc(**changes: Any) -> bytes:
        body: dict[str, Any] = {"device_id": "obs-bad", "timestamp": BASE_MS, "latitude": 54.6872,
                                "longitude": 25.2797}
        body.update(changes)
        return json.dumps({k: v for k, v in body.items() if v is not ...}).encode()

    return {
        "missing_payload": {b"other": b"no payload field here"},
        "too_large": {b"payload": doc(device_id="obs-bad-big", attributes={"1": "x" * (MAX_PAYLOAD + 10)})},
        "invalid_json": {b"payload": b'{"device_id": "obs-bad-json", "timestamp": '},
        "missing_field": {b"payload": doc(device_id="obs-bad-missing", latitude=...)},
        "invalid_type": {b"payload": doc(device_id="obs-bad-type", latitude="54.6")},
        "out_of_range": {b"payload": doc(device_id="obs-bad-range", latitude=91.0)},
        "invalid_timestamp": {b"payload": doc(device_id="obs-bad-ts", timestamp="2023-11-14 22:13:20")},
        "timestamp_out_of_window": {b"payload": doc(device_id="obs-bad-window", timestamp=946_684_799_000)},
        "invalid_device_id": {b"payload": doc(device_id="")},
        "unknown_sentinel": {b"payload": doc(device_id="obs-bad-unknown", attributes={"1": {"__decimal": "1.5"}})},
        "invalid_sentinel": {b"payload": doc(device_id="obs-bad-sentinel", attributes={"1": {"__bigint": "12x"}})},
        "nul_character": {b"payload": doc(device_id="obs-bad-nul", attributes={"1": "a\u0000b"})},
    }


def _xadd_all(client: redis.Redis, stream: str, entries: list[dict[bytes, bytes]]) -> list[str]:
    """XADD each field mapping, in order; the entry ids."""
    pipe = client.pipeline(transaction=False)
    for fields in entries:
        pipe.xadd(stream, fields)
    return [i.decode() for i in pipe.execute()]


def _valid(i: int, devices: int) -> bytes:
    return payload(f"obs-dev-{i % devices:02d}", BASE_MS + i * 1000, speed=float(i % 90))


def _settled(client: redis.Redis, keys: dict[str, str], pg_url: str, rows: int) -> bool:
    return row_count(pg_url) == rows and pending_count(client, keys["stream"], keys["group"]) == 0


def _base(port: int) -> str:
    return f"http://127.0.0.1:{port}"


def _scrape(port: int) -> str:
    status, body = http_get(_base(port) + "/metrics")
    assert status == 200, body
    return body


def _value(text: str, name: str, labels: dict[str, str] | None = None) -> float:
    value = metric_value(text, name, labels)
    assert value is not None, f"{name}{labels or ''} is not in the exposition"
    return value


def _promtool_check(exposition: str) -> subprocess.CompletedProcess:
    return subprocess.run(["promtool", "check", "metrics"], input=exposition.encode(), capture_output=True,
                          check=False, timeout=60)


def _listening_ports(pid: int) -> set[int]:
    """TCP ports process ``pid`` listens on: its socket inodes matched against /proc/<pid>/net/tcp{,6}."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    ports = set()
    for table in ("tcp", "tcp6"):
        path = Path(f"/proc/{pid}/net/{table}")
        if not path.exists():
            continue
        for line in path.read_text().splitlines()[1:]:
            cols = line.split()
            if cols[3] == "0A" and cols[9] in inodes:  # 0A: LISTEN
                ports.add(int(cols[1].rsplit(":", 1)[1], 16))
    return ports


def _socket_open(sock: socket.socket) -> bool:
    """True while the peer has not closed ``sock`` (nothing to read, no EOF)."""
    timeout = sock.gettimeout()
    sock.setblocking(False)
    try:
        return sock.recv(1, socket.MSG_PEEK) != b""
    except BlockingIOError:
        return True
    except OSError:
        return False
    finally:
        sock.settimeout(timeout)


# --- 1. the metrics over a known input -------------------------------------------------------------------

def _known_input(batch: int) -> tuple[list[dict[bytes, bytes]], dict[str, int]]:
    """N valid (distinct keys), D duplicates (same batch and later batches), one entry per decode reason.

    Returns the entries in stream order and the expected figures.
    """
    n, devices = 200, 9
    valid = [_valid(i, devices) for i in range(n)]
    # (position after which to insert, index of the valid entry duplicated): in the same batch as the
    # original (a few entries after it) and in later batches (at the end of the stream).
    stream: list[tuple[str, Any]] = [("valid", i) for i in range(n)]
    same_batch = [3, 10, 20, 57, 130]
    later = [0, 1, 5, 64, 99, 150, 199, 3]  # 3 twice: a third copy of the same key
    for j in reversed(same_batch):
        stream.insert(j + 3, ("dup", j))
    stream.extend(("dup", j) for j in later)
    rejects = _rejects()
    for k, reason in enumerate(rejects):
        stream.insert(15 + k * 17, ("reject", reason))
    entries: list[dict[bytes, bytes]] = []
    for kind, what in stream:
        if kind == "valid":
            entries.append({b"payload": valid[what]})
        elif kind == "dup":  # same device and ts, other fields differ: still a duplicate
            body = json.loads(valid[what])
            body["speed"] = 1.5
            entries.append({b"payload": json.dumps(body).encode()})
        else:
            entries.append(rejects[what])
    # The layout does what it says: duplicates in the batch of their original and in later batches.
    where = {("valid", i): pos // batch for pos, (kind, i) in enumerate(stream) if kind == "valid"}
    dup_batches = [(pos // batch, where[("valid", i)]) for pos, (kind, i) in enumerate(stream) if kind == "dup"]
    assert any(b == o for b, o in dup_batches) and any(b > o for b, o in dup_batches)
    total = len(entries)
    expected = {"n": n, "d": len(same_batch) + len(later), "devices": devices, "total": total,
                "batches": -(-total // batch)}
    assert total == expected["n"] + expected["d"] + len(DECODE_REASONS)
    return entries, expected


@pytest.mark.backends("plain", "timescaledb")
def test_the_known_input_gives_exact_metrics(redis_url, redis_client, pg_url, keys) -> None:
    batch = 50
    entries, want = _known_input(batch)
    rejects = _rejects()
    decoder = Decoder(max_payload_bytes=MAX_PAYLOAD)
    for reason, fields in rejects.items():  # each crafted entry is rejected for the reason it stands for
        result = decoder.decode(fields)
        assert isinstance(result, Rejection) and result.reason == reason, (reason, result)
    assert set(rejects) == set(DECODE_REASONS)
    started = time.time()
    ids = _xadd_all(redis_client, keys["stream"], entries)
    port = free_port()
    config = config_for(redis_url, pg_url, keys, batch_size=batch, max_payload_bytes=MAX_PAYLOAD,
                        metrics_port=port, metrics_host="127.0.0.1")
    with InProcessService(config) as svc:
        wait_until(lambda: _settled(redis_client, keys, pg_url, want["n"]), 30, message=f"{want['n']} rows")
        wait_until(lambda: svc.sample("processor_acks_total") == want["total"], 10, message="every ack")
        svc.service.monitor.refresh()
        text = _scrape(port)
    assert svc.exit_code == 0

    n, d, total = want["n"], want["d"], want["total"]
    assert _value(text, "processor_records_written_total", {"status": "inserted"}) == n
    assert _value(text, "processor_records_written_total", {"status": "duplicate"}) == d
    assert _value(text, "processor_records_written_total", {"status": "failed"}) == 0
    for reason in REASONS:
        expected = 1 if reason in DECODE_REASONS else 0
        assert _value(text, "processor_records_dead_lettered_total", {"reason": reason}) == expected, reason
    assert _value(text, "processor_acks_total") == total == n + d + 12
    assert _value(text, "processor_records_consumed_total") == total
    # obs-dev-NN is not alphanumeric: the compiled way leaves every entry here to the Python ways
    assert _value(text, "processor_entries_decoded_total", {"way": "compiled"}) == 0
    assert _value(text, "processor_entries_decoded_total", {"way": "python"}) == total
    assert _value(text, "processor_pending_entries") == 0
    assert _value(text, "processor_stream_lag") == 0
    assert _value(text, "processor_inflight_batches") == 0
    assert _value(text, "processor_devices_tracked") == want["devices"]
    assert _value(text, "processor_batch_size_count") == want["batches"]
    assert _value(text, "processor_batch_size_sum") == total
    assert _value(text, "processor_end_to_end_seconds_count") == n + d
    assert _value(text, "processor_batch_write_seconds_count") >= 1
    assert _value(text, "processor_ready") == 1
    assert started <= _value(text, "processor_last_write_timestamp_seconds") <= time.time()
    for name in ("processor_reclaimed_total", "processor_entries_lost_total", "processor_redis_errors_total",
                 "processor_postgres_errors_total", "processor_domain_handler_errors_total"):
        assert _value(text, name) == 0, name
    assert _value(text, "processor_info", {"version": __version__, "decoder": "compiled"}) == 1
    # What the figures say is what happened.
    assert row_count(pg_url) == n
    assert Counter(d["reason"].decode() for d in dead_letters(redis_client, keys["dead"])) == \
        {reason: 1 for reason in DECODE_REASONS}
    _assert_bounded_labels(text, ids)


def _assert_bounded_labels(text: str, entry_ids: list[str]) -> None:
    """Every label value comes from a fixed set: no device id, no entry id, nothing unbounded."""
    buckets = {repr(float(b)) for b in (*WRITE_BUCKETS, *E2E_BUCKETS, *SIZE_BUCKETS)} | {"+Inf"}
    allowed = {"status": set(STATUSES), "reason": set(REASONS), "le": buckets, "version": {__version__},
               "decoder": {"compiled", "python"}, "way": set(WAYS)}
    seen: set[str] = set()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            for label, value in sample.labels.items():
                assert label in allowed, f"{sample.name} has label {label}={value!r}"
                assert value in allowed[label], f"{sample.name}{{{label}={value!r}}} is not a bounded value"
                seen.add(label)
    assert seen == set(allowed)  # the check above did look at every kind of label
    assert "obs-dev" not in text and "obs-bad" not in text
    assert not [i for i in entry_ids if i in text]


# --- 2. readiness follows the last Redis and PostgreSQL outcome ------------------------------------------

def _ready(port: int) -> tuple[int, str]:
    return http_get(_base(port) + "/readyz")


@pytest.mark.backends("plain")
def test_entries_decoded_counts_each_way(redis_url, redis_client, pg_url, keys) -> None:
    """The compiled way's share is visible: a new upstream shape it does not take shows as way="python"."""
    fleet = list(Fleet(30, seed=3, start_ms=BASE_MS).payloads(30))  # tcp-ingestion's shape
    unusual = [payload(f"dev-{i}", BASE_MS + i) for i in range(20)]  # valid, but a '-' in the id
    rejected = [b"{", b'{"device_id":"x"}', b"[]", b'{"device_id":"y","timestamp":"never"}', b"null"]
    publish(redis_client, keys["stream"], fleet + unusual + rejected)
    config = config_for(redis_url, pg_url, keys, batch_size=20)
    with InProcessService(config) as svc:
        wait_until(lambda: svc.sample("processor_acks_total") == 55, 30, message="55 entries acknowledged")
        assert svc.sample("processor_entries_decoded_total", {"way": "compiled"}) == 30
        assert svc.sample("processor_entries_decoded_total", {"way": "python"}) == 25
    assert row_count(pg_url) == 50


def test_readyz_is_503_naming_postgres_while_it_is_down_and_200_within_a_refresh_after(
        redis_url, keys, throwaway_postgres) -> None:
    interval = 0.5
    port = free_port()
    config = config_for(redis_url, throwaway_postgres.url, keys, metrics_port=port, metrics_host="127.0.0.1")
    with InProcessService(config, monitor_interval_s=interval) as svc:
        wait_until(lambda: _ready(port)[0] == 200, 10, message="/readyz 200")
        assert _ready(port)[1] == "ok\n"
        throwaway_postgres.stop()
        status, body = wait_until(lambda: (r := _ready(port))[0] == 503 and r, 10, message="/readyz 503")
        assert body.startswith("postgres: "), body
        assert "redis" not in body
        assert svc.sample("processor_ready") == 0
        assert svc.sample("processor_postgres_errors_total") >= 1
        assert http_get(_base(port) + "/healthz")[0] == 200  # not ready is not dead: no restart wanted
        throwaway_postgres.start()
        # Within one refresh, plus the new connection (a generous bound for a loaded machine).
        wait_until(lambda: _ready(port)[0] == 200, interval + 5, 0.05, "/readyz 200 after PostgreSQL is back")
        wait_until(lambda: svc.sample("processor_ready") == 1, interval + 5, message="processor_ready 1")
    assert svc.exit_code == 0


def test_readyz_is_503_naming_redis_while_it_is_down(pg_url, keys, throwaway_redis) -> None:
    port = free_port()
    config = config_for(throwaway_redis.url, pg_url, keys, metrics_port=port, metrics_host="127.0.0.1")
    with InProcessService(config, monitor_interval_s=0.5) as svc:
        wait_until(lambda: _ready(port)[0] == 200, 10, message="/readyz 200")
        throwaway_redis.stop()
        status, body = wait_until(lambda: (r := _ready(port))[0] == 503 and r, 10, message="/readyz 503")
        assert body.startswith("redis: "), body
        assert "postgres" not in body
        throwaway_redis.start()
        # The pipeline's Redis backoff is short here (Redis was down about a second); 30 s is its cap.
        wait_until(lambda: _ready(port)[0] == 200, 35, 0.1, "/readyz 200 after Redis is back")
        assert svc.sample("processor_redis_errors_total") >= 1
    assert svc.exit_code == 0


# --- 3. liveness: the main loop turning --------------------------------------------------------------------

class _Blocking:
    """A domain handler that holds the main loop until released (at most 30 s, so a test never hangs)."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()
        self.timed_out = False

    def __call__(self, records, results, state) -> None:
        self.entered.set()
        if not self.release.wait(30):
            self.timed_out = True


def test_healthz_is_503_while_the_main_loop_is_stuck_and_200_otherwise(
        redis_url, redis_client, pg_url, keys) -> None:
    port = free_port()
    handler = _Blocking()
    config = config_for(redis_url, pg_url, keys, metrics_port=port, metrics_host="127.0.0.1")
    svc = InProcessService(config, handlers=[handler])
    assert svc.service.health.stall_after_s == 10.0  # max(3 x BLOCK_MS, 10 s) with BLOCK_MS=200
    svc.service.health.stall_after_s = 1.0
    healthz = _base(port) + "/healthz"
    with svc:
        try:
            wait_until(lambda: http_get(healthz)[0] == 200, 10, message="/healthz 200")
            for _ in range(5):  # a loop turning every BLOCK_MS stays alive over several stall windows
                assert http_get(healthz) == (200, "ok\n")
                time.sleep(0.3)
            publish(redis_client, keys["stream"], [payload("obs-stuck", BASE_MS)])
            assert handler.entered.wait(10), "the handler was never called"
            status, body = wait_until(lambda: (r := http_get(healthz))[0] == 503 and r, 10,
                                      message="/healthz 503")
            assert "main loop has not turned" in body, body
            assert _ready(port)[0] == 200  # stuck is not unready: readiness is about the servers
        finally:
            handler.release.set()  # also on failure, so that the service stops at once
        wait_until(lambda: http_get(healthz)[0] == 200, 10, message="/healthz 200 after the handler returned")
        wait_until(lambda: _settled(redis_client, keys, pg_url, 1), 10, message="the row and its ack")
    assert not handler.timed_out
    assert svc.exit_code == 0


# --- 4. the HTTP endpoint: 404, and a slow scraper does not slow the pipeline -------------------------------

def test_unknown_paths_are_404_and_query_strings_are_ignored(redis_url, pg_url, keys) -> None:
    port = free_port()
    config = config_for(redis_url, pg_url, keys, metrics_port=port, metrics_host="127.0.0.1")
    with InProcessService(config):
        for path in ("/", "/nope", "/metrics/extra", "/healthzz", "/READYZ"):
            status, body = http_get(_base(port) + path)
            assert status == 404, path
            assert "/metrics" in body
        status, body = http_get(_base(port) + "/metrics?name[]=processor_acks_total")
        assert status == 200 and "processor_acks_total" in body
        wait_until(lambda: http_get(_base(port) + "/readyz?verbose=1") == (200, "ok\n"), 10, message="readyz")


def test_a_held_scrape_does_not_slow_the_pipeline(redis_url, redis_client, pg_url, keys) -> None:
    port = free_port()
    count = 3000
    config = config_for(redis_url, pg_url, keys, metrics_port=port, metrics_host="127.0.0.1")
    with InProcessService(config) as svc:
        # Scrapers that never finish their request: one with half the headers, one that sent nothing.
        partial = socket.create_connection(("127.0.0.1", port), timeout=5)
        partial.sendall(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        silent = socket.create_connection(("127.0.0.1", port), timeout=5)
        try:
            held_at = time.monotonic()
            publish(redis_client, keys["stream"], (_valid(i, 50) for i in range(count)))
            wait_until(lambda: _settled(redis_client, keys, pg_url, count), 30, message=f"{count} rows")
            def all_acks_counted() -> str | None:
                text = _scrape(port)  # another client is answered while those two are held
                return text if _value(text, "processor_acks_total") == count else None

            # Acknowledgements ride on the next read and are counted when its reply is back: a moment later.
            text = wait_until(all_acks_counted, 5, 0.05, "every acknowledgement counted")
            assert _value(text, "processor_records_written_total", {"status": "inserted"}) == count
            # Still held: everything above happened while they were open (the server drops an idle
            # connection after httpserver._Handler.timeout seconds).
            assert time.monotonic() - held_at < httpserver._Handler.timeout, "too slow to prove anything"
            assert _socket_open(partial) and _socket_open(silent)
            # The held scrape was a real one, only waiting: finish it and it is answered.
            partial.sendall(b"Connection: close\r\n\r\n")
            reply = b""
            while chunk := partial.recv(65536):
                reply += chunk
            head, _, body = reply.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.0 200") or head.startswith(b"HTTP/1.1 200"), head
            assert metric_value(body.decode(), "processor_acks_total") == count
        finally:
            partial.close()
            silent.close()
        assert svc.sample("processor_records_written_total", {"status": "inserted"}) == count


def test_a_scraper_that_stops_sending_is_dropped_after_the_handler_timeout(
        redis_url, pg_url, keys, monkeypatch) -> None:
    monkeypatch.setattr(httpserver._Handler, "timeout", 1.0)
    port = free_port()
    config = config_for(redis_url, pg_url, keys, metrics_port=port, metrics_host="127.0.0.1")
    with InProcessService(config):
        held = socket.create_connection(("127.0.0.1", port), timeout=5)
        try:
            held.sendall(b"GET /metrics HTTP/1.1\r\n")
            wait_until(lambda: not _socket_open(held), 10, 0.1, "the server to drop the idle scraper")
        finally:
            held.close()
        assert http_get(_base(port) + "/healthz")[0] == 200


# --- 5. promtool on the live exposition ---------------------------------------------------------------

@needs_promtool
def test_promtool_accepts_the_live_exposition(redis_url, redis_client, pg_url, keys) -> None:
    port = free_port()
    entries = [{b"payload": _valid(i, 5)} for i in range(40)] + [{b"payload": _valid(3, 5)}]
    entries += list(_rejects().values())
    _xadd_all(redis_client, keys["stream"], entries)
    config = config_for(redis_url, pg_url, keys, batch_size=16, max_payload_bytes=MAX_PAYLOAD,
                        metrics_port=port, metrics_host="127.0.0.1")
    with InProcessService(config) as svc:
        wait_until(lambda: svc.sample("processor_acks_total") == len(entries), 30, message="every ack")
        svc.service.monitor.refresh()
        text = _scrape(port)
    assert _value(text, "processor_records_written_total", {"status": "duplicate"}) == 1
    result = _promtool_check(text)
    assert result.returncode == 0, result.stdout.decode() + result.stderr.decode()
    # The checker does check: a counter without _total and a malformed line are refused.
    broken = text + "# HELP bad_counter x\n# TYPE bad_counter counter\nbad_counter 1\nnot a metric line\n"
    assert _promtool_check(broken).returncode != 0


# --- 6. METRICS_PORT=0 --------------------------------------------------------------------------------

def test_metrics_port_0_disables_the_http_server(service_env) -> None:
    port = free_port()
    with_server = dict(service_env, METRICS_PORT=str(port), METRICS_HOST="127.0.0.1",
                       CONSUMER_NAME=service_env["CONSUMER_NAME"] + "-http")
    assert service_env["METRICS_PORT"] == "0"
    # Both at once; the one with a port is the control that shows the check can see a listener.
    with ServiceProcess(service_env) as off, ServiceProcess(with_server) as on:
        off.wait_for_log("processor ready")
        on.wait_for_log("processor ready")
        assert _listening_ports(off.proc.pid) == set()
        assert not [m for m in off.messages() if "metrics on" in m]
        assert _listening_ports(on.proc.pid) == {port}
        assert [m for m in on.messages() if "metrics on" in m] == [f"metrics on http://127.0.0.1:{port}/metrics"]
        assert http_get(_base(port) + "/healthz")[0] == 200


# --- 7. the heartbeat ---------------------------------------------------------------------------------

HEARTBEAT = re.compile(r"heartbeat records_per_s=(\d+) lag=(\d+) pending=(\d+) inflight=(\d+)")


class _Slow:
    """A domain handler that takes a little time per batch, so that the pipeline stays busy for a while."""

    def __call__(self, records, results, state) -> None:
        time.sleep(0.03)


def test_the_pipeline_logs_a_heartbeat_while_busy_and_none_while_idle(
        redis_url, redis_client, pg_url, keys, caplog, monkeypatch) -> None:
    monkeypatch.setattr(pipeline_module, "HEARTBEAT_S", 0.2)
    caplog.set_level(logging.INFO, logger=PIPELINE_LOGGER)
    count = 3000
    config = config_for(redis_url, pg_url, keys, batch_size=50)
    with InProcessService(config, handlers=[_Slow()], monitor_interval_s=0.2):
        publish(redis_client, keys["stream"], (_valid(i, 30) for i in range(count)))
        wait_until(lambda: _settled(redis_client, keys, pg_url, count), 30, message=f"{count} rows")
        busy = [r for r in caplog.records if r.name == PIPELINE_LOGGER and r.getMessage().startswith("heartbeat")]
        assert busy, "no heartbeat while 3,000 positions went through"
        for record in busy:
            assert record.levelno == logging.INFO
            assert HEARTBEAT.fullmatch(record.getMessage()), record.getMessage()
            assert record.consumer == keys["consumer"]
        rates = [int(HEARTBEAT.fullmatch(r.getMessage()).group(1)) for r in busy]
        assert max(rates) > 0
        # Idle: once the last busy period is reported, the heartbeat is silent.
        time.sleep(0.6)
        caplog.clear()
        time.sleep(1.0)
        assert not [r for r in caplog.records if r.getMessage().startswith("heartbeat")]


# --- 8. the domain seam -------------------------------------------------------------------------------

class _Recorder:
    """Records every call; checks, during the call, that the state it is given tracks each record's device."""

    def __init__(self) -> None:
        self.calls: list[list[tuple[str, tuple[str, int], WriteStatus]]] = []
        self.untracked: list[str] = []

    def __call__(self, records, results, state) -> None:
        assert len(records) == len(results)
        self.calls.append([(r.entry_id, (r.position.device_id, int(r.position.ts.timestamp() * 1000)), w.status)
                           for r, w in zip(records, results)])
        self.untracked += [r.position.device_id for r in records if state.get(r.position.device_id) is None]


class _Raising:
    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, records, results, state) -> None:
        self.calls += 1
        raise RuntimeError("domain rule exploded")


def test_handlers_see_every_stored_batch_and_a_raising_one_holds_nothing_up(
        redis_url, redis_client, pg_url, keys, caplog) -> None:
    caplog.set_level(logging.INFO, logger=PIPELINE_LOGGER)
    n, devices = 150, 7
    valid = [{b"payload": _valid(i, devices)} for i in range(n)]
    dups = [{b"payload": _valid(i, devices)} for i in (0, 1, 2, 77, 149)]
    rejects = _rejects()
    entries = valid[:60] + [rejects["invalid_json"]] + dups[:3] + valid[60:] + dups[3:] + [rejects["out_of_range"]]
    ids = _xadd_all(redis_client, keys["stream"], entries)
    stored_ids = {i for i, e in zip(ids, entries) if e not in (rejects["invalid_json"], rejects["out_of_range"])}
    raising, recorder = _Raising(), _Recorder()
    config = config_for(redis_url, pg_url, keys, batch_size=40)
    with InProcessService(config, handlers=[raising, recorder]) as svc:
        wait_until(lambda: _settled(redis_client, keys, pg_url, n), 30, message=f"{n} rows, none pending")
        wait_until(lambda: svc.sample("processor_acks_total") == len(entries), 10, message="every ack")
        assert svc.sample("processor_domain_handler_errors_total") == raising.calls
    assert svc.exit_code == 0
    # The recorder, after the raising handler, got every stored entry once, with its write result.
    seen = [entry for call in recorder.calls for entry in call]
    assert sorted(e[0] for e in seen) == sorted(stored_ids)
    assert Counter(e[2] for e in seen) == {WriteStatus.INSERTED: n, WriteStatus.DUPLICATE: len(dups)}
    inserted_keys = Counter(e[1] for e in seen if e[2] is WriteStatus.INSERTED)
    assert len(inserted_keys) == n and set(inserted_keys.values()) == {1}  # each key inserted exactly once
    assert recorder.untracked == []
    assert raising.calls == len(recorder.calls) >= 4  # 173 entries in batches of 40
    failures = [r for r in caplog.records if r.name == PIPELINE_LOGGER and "domain handler" in r.getMessage()]
    assert len(failures) == raising.calls
    assert all(r.levelno == logging.ERROR and r.exc_info and "domain rule exploded" in str(r.exc_info[1])
               for r in failures)
    assert row_count(pg_url) == n
    assert pending_count(redis_client, keys["stream"], keys["group"]) == 0
