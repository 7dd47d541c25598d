"""The fault-injection suite (issue 5): loads, the running processor, and the one invariant.

Every test in this folder is marked ``faults`` (``make faults`` runs them alone, the soak aside) and
ends with :func:`assert_nothing_lost`: the positions published equal the rows in
``positions`` plus the dead letters, nothing is pending in the group, and every dead
letter carries the reason its entry deserves (none for an entry that should have been written).
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import psycopg2
import pytest
import redis

from processor.core.decode import Decoder
from processor.core.types import Position
from processor.simulate import Fleet
from tests.helpers import ServiceProcess, free_port, http_get, metric_value, pending_count, wait_until

HERE = Path(__file__).resolve().parent

Fields = Mapping[bytes, bytes]
Key = tuple[str, datetime]  # (device_id, ts): the primary key of positions

# The service's defaults (MAX_PAYLOAD_BYTES 65536, MAX_FUTURE_SKEW_S 86400): what it decides, we decide.
DECODER = Decoder()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # A conftest hook sees every collected item, not only this folder's.
    for item in items:
        if HERE in Path(item.path).parents:
            item.add_marker(pytest.mark.faults)


# --- loads -------------------------------------------------------------------------------------

def fleet_entries(n: int, *, devices: int = 500, seed: int = 5) -> list[dict[bytes, bytes]]:
    """``n`` realistic entries (moving trackers, sentinels), every (device_id, ts) distinct."""
    return [{b"payload": p} for p in Fleet(devices, seed=seed).payloads(n)]


def publish_entries(client: redis.Redis, stream: str, entries: Iterable[Fields],
                    chunk: int = 1000, atomic: bool = False) -> dict[str, Fields]:
    """XADD each entry with its fields as given; entry id -> fields, in stream order.

    ``atomic``: each chunk in one MULTI/EXEC, so a running service reads it as one batch (not as
    several small ones that meet the in-flight bound when the write is meant to wait).
    """
    published: dict[str, Fields] = {}
    batch: list[Fields] = []

    def flush() -> None:
        pipe = client.pipeline(transaction=atomic)
        for fields in batch:
            pipe.xadd(stream, dict(fields))
        for entry_id, fields in zip(pipe.execute(), batch):
            published[entry_id.decode()] = fields
        batch.clear()

    for fields in entries:
        batch.append(fields)
        if len(batch) == chunk:
            flush()
    if batch:
        flush()
    return published


def read_as_dead_consumer(client: redis.Redis, stream: str, group: str, count: int,
                          consumer: str = "dead-consumer") -> list[str]:
    """XREADGROUP ``count`` new entries as ``consumer`` and never acknowledge them: a consumer that died."""
    try:
        client.xgroup_create(stream, group, id="0", mkstream=True)
    except redis.ResponseError as exc:
        if "BUSYGROUP" not in str(exc):
            raise
    reply = client.xreadgroup(group, consumer, {stream: ">"}, count=count)
    return [entry_id.decode() for entry_id, _ in reply[0][1]] if reply else []


# --- the processor -----------------------------------------------------------------------------

@pytest.fixture
def fault_env(service_env: dict[str, str]) -> dict[str, str]:
    """``service_env`` tuned for quick scenarios: short blocking reads, info logs."""
    return dict(service_env, BLOCK_MS="200", LOG_LEVEL="info")


def with_metrics(env: Mapping[str, str]) -> tuple[dict[str, str], str]:
    """``env`` with the metrics endpoint on a free port, and the URL of its /metrics."""
    port = free_port()
    return dict(env, METRICS_HOST="127.0.0.1", METRICS_PORT=str(port)), f"http://127.0.0.1:{port}"


def scrape(base_url: str, name: str, labels: dict[str, str] | None = None) -> float | None:
    """One sample of the processor's /metrics (None when absent)."""
    status, text = http_get(base_url + "/metrics")
    assert status == 200, text
    return metric_value(text, name, labels)


def log_entries(proc: ServiceProcess, text: str, level: str | None = None) -> list[dict[str, Any]]:
    """The process's JSON log lines whose message holds ``text`` (at ``level`` if given)."""
    return [e for e in proc.logs() if text in e.get("msg", "") and (level is None or e.get("level") == level)]


# --- the invariant -----------------------------------------------------------------------------

@dataclass(frozen=True)
class Outcome:
    """What a scenario ended with, for its own exact assertions and docs/reliability.md."""

    rows: int
    dead_letters: dict[str, int]  # reason -> count
    deliveries: dict[str, int]  # source id -> the `deliveries` field of its dead letter


def stored_keys(pg_url: str) -> set[Key]:
    conn = psycopg2.connect(pg_url)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT device_id, ts FROM positions")
            return {(device_id, ts) for device_id, ts in cur.fetchall()}
    finally:
        conn.close()


def _sample(items: Iterable[Any], n: int = 5) -> list[Any]:
    return sorted(items, key=repr)[:n]


def assert_nothing_lost(client: redis.Redis, pg_url: str, keys: Mapping[str, str],
                        published: Mapping[str, Fields], *, letters: Mapping[str, str] | None = None,
                        gone: Collection[str] = ()) -> Outcome:
    """The invariant every scenario ends with.

    - The (device_id, ts) of every published entry that decodes is in ``positions`` or in
      the dead-letter stream (its payload decoded), and nothing else is in either.
    - Every entry the decoder rejects is dead-lettered once, compared by ``source_id``, with
      the decoder's reason and its original payload.
    - An entry that decodes is dead-lettered only if ``letters`` names it (source id ->
      the expected reason, e.g. ``db_rejected``): nothing that should have been written was not.
    - Nothing is pending in the group.

    ``gone``: entries whose data was lost outside the processor (with a Redis that kept
    nothing, or trimmed before they were processed): they may be stored or not, no more.
    """
    letters = dict(letters or {})
    gone = set(gone)
    now = time.time()
    valid: dict[Key, set[str]] = {}
    rejected: dict[str, str] = {}
    for entry_id, fields in published.items():
        result = DECODER.decode(fields, now)
        if isinstance(result, Position):
            valid.setdefault((result.device_id, result.ts), set()).add(entry_id)
        else:
            rejected[entry_id] = result.reason
    assert not set(letters) & set(rejected), "letters names entries the decoder rejects anyway"

    dead = [{k.decode(): v for k, v in f.items()} for _, f in client.xrange(keys["dead"])]
    by_source = Counter(d["source_id"].decode() for d in dead)
    twice = [i for i, n in by_source.items() if n > 1]
    assert not twice, f"dead-lettered more than once: {_sample(twice)}"
    dead_keys: set[Key] = set()
    for d in dead:
        source_id, reason = d["source_id"].decode(), d["reason"].decode()
        assert d["source_stream"].decode() == keys["stream"] and d["group"].decode() == keys["group"]
        assert source_id in published, f"dead letter for an entry never published: {source_id}"
        assert d["payload"] == published[source_id].get(b"payload", b""), f"payload of {source_id} changed"
        expected = rejected.get(source_id) or letters.get(source_id)
        assert reason == expected, f"{source_id} dead-lettered as {reason}, expected {expected}"
        if source_id not in rejected:  # a position refused downstream: account for it by its key
            result = DECODER.decode({b"payload": d["payload"]}, now)
            assert isinstance(result, Position), f"{source_id}: {result}"
            dead_keys.add((result.device_id, result.ts))
    missing_letters = (set(rejected) | set(letters)) - set(by_source) - gone
    assert not missing_letters, f"{len(missing_letters)} entries not dead-lettered: {_sample(missing_letters)}"

    rows = stored_keys(pg_url)
    must = {k for k, ids in valid.items() if ids - gone}
    may = must | {k for k, ids in valid.items() if ids & gone}
    accounted = rows | dead_keys
    assert not rows & dead_keys, f"both stored and dead-lettered: {_sample(rows & dead_keys)}"
    assert not must - accounted, f"{len(must - accounted)} positions lost: {_sample(must - accounted)}"
    assert not accounted - may, f"{len(accounted - may)} never published: {_sample(accounted - may)}"
    assert pending_count(client, keys["stream"], keys["group"]) == 0, "entries still pending"
    return Outcome(rows=len(rows), dead_letters=dict(Counter(d["reason"].decode() for d in dead)),
                   deliveries={d["source_id"].decode(): int(d["deliveries"]) for d in dead})


def wait_or_explain(proc: ServiceProcess, predicate: Callable[[], Any], timeout: float = 30.0,
                    interval: float = 0.05, message: str = "condition") -> None:
    """``wait_until``, failing at once if the process exits; the failure shows its last warnings and errors."""
    def done() -> Any:
        if proc.proc is not None and proc.proc.poll() is not None:
            raise AssertionError(f"the processor exited {proc.proc.returncode} before {message}")
        return predicate()

    try:
        wait_until(done, timeout, interval, message)
    except AssertionError as exc:
        tail = [f"{e.get('ts')} {e.get('level')} {e.get('msg')} {e.get('exc', '')[-800:]}"
                for e in proc.logs() if e.get("level") != "info"][-30:]
        state = "running" if proc.proc is not None and proc.proc.poll() is None else "exited"
        raise AssertionError(f"{exc}; processor {state}, its last warnings:\n" + "\n".join(tail)) from None
