"""10,000 random and mutated payloads mixed into 10,000 valid ones (issue 5: 10)."""

from __future__ import annotations

import json
import random
import signal
from collections import Counter
from collections.abc import Callable
from typing import Any

from processor.core.types import DB_REJECTED, MAX_DELIVERIES, REASONS, Position
from processor.simulate import Fleet
from tests.faults.conftest import (DECODER, assert_nothing_lost, log_entries, publish_entries, scrape,
                                   wait_or_explain, with_metrics)
from tests.helpers import ServiceProcess, pending_count, row_count

VALID = INVALID = 10_000
REQUIRED = ("device_id", "timestamp", "latitude", "longitude")
OPTIONAL = ("altitude", "angle", "speed", "satellites", "priority", "event_id", "attributes")
ODD_VALUES: list[Any] = [None, "", "x", "12", True, False, 1.5, -1, 0, 2**31, 10**20, -(10**20), [], {}, [1],
                         float("nan"), float("inf"), 1e39, 1e-50, "\u0000", "2023-11-14T22:13:20Z", {"__bigint": "7"}]
ODD_TIMESTAMPS: list[Any] = ["2023-13-01T00:00:00Z", "yesterday", "2023-11-14T22:13:20", "2023-11-14T22:13:20+25:00",
                             "1999-12-31T23:59:59Z", 946_684_799_999, 4_102_444_800_000, 1.7e12, "2023-W46-2",
                             "20231114T221320Z", "2023-11-14 22:13:20,5+02:00", -1, 2**70]
ODD_DEVICE_IDS: list[Any] = ["", "d" * 65, "dev\x01ce", "dev\x7f", "tab\tok", 356307042441013, ["x"]]
ODD_ATTRIBUTES: list[Any] = [
    {"1": {"__bigint": "12x"}}, {"1": {"__bigint": ""}}, {"1": {"__buffer": "%%%"}}, {"1": {"__buffer": 5}},
    {"1": {"__nope": 1}}, {"1": [{"__weird": "x"}]}, {"1": {"type": "Buffer", "data": [256]}},
    {"1": {"type": "Buffer", "data": "AA=="}}, [], "attrs", 5, {"__bigint": "1"}, {"1": "a\u0000b"},
    {"a\u0000": 1}, {"1": {"__bigint": "9" * 101}}, {"deep": json.loads("[" * 40 + "]" * 40)},
]


def _as_json(doc: Any) -> bytes:
    return json.dumps(doc).encode()  # Python's json writes NaN and Infinity, which JSON has not


def _set(field: str, choices: list[Any]) -> Callable[[random.Random, dict[str, Any]], bytes]:
    def mutate(rng: random.Random, doc: dict[str, Any]) -> bytes:
        doc[field] = rng.choice(choices)
        return _as_json(doc)
    return mutate


def _odd_field(rng: random.Random, doc: dict[str, Any]) -> bytes:
    doc[rng.choice(REQUIRED + OPTIONAL)] = rng.choice(ODD_VALUES)
    return _as_json(doc)


def _drop_required(rng: random.Random, doc: dict[str, Any]) -> bytes:
    del doc[rng.choice(REQUIRED)]
    return _as_json(doc)


def _out_of_range(rng: random.Random, doc: dict[str, Any]) -> bytes:
    field, value = rng.choice([("latitude", 90.0001), ("latitude", -91), ("longitude", 180.5), ("angle", 360.5),
                               ("angle", -1), ("speed", -0.1), ("satellites", 256), ("priority", 3),
                               ("event_id", -1), ("event_id", 2**31), ("altitude", 3.5e38)])
    doc[field] = value
    return _as_json(doc)


def _truncate(rng: random.Random, doc: dict[str, Any]) -> bytes:
    raw = _as_json(doc)
    return raw[:rng.randrange(1, len(raw))]


def _flip_bytes(rng: random.Random, doc: dict[str, Any]) -> bytes:
    raw = bytearray(_as_json(doc))
    for _ in range(rng.randint(1, 3)):
        raw[rng.randrange(len(raw))] = rng.randrange(256)
    return bytes(raw)


def _random_bytes(rng: random.Random, doc: dict[str, Any]) -> bytes:
    return bytes(rng.randrange(256) for _ in range(rng.randint(1, 200)))


def _not_an_object(rng: random.Random, doc: dict[str, Any]) -> bytes:
    return rng.choice([b"[1, 2]", b'"position"', b"42", b"null", b"true", b"", b" ", b"{}"])


def _lone_surrogate(rng: random.Random, doc: dict[str, Any]) -> bytes:
    return _as_json(doc).replace(b'"device_id": "', b'"device_id": "\\ud800', 1)


def _bad_utf8(rng: random.Random, doc: dict[str, Any]) -> bytes:
    return _as_json(doc).replace(b'"device_id": "', b'"device_id": "\xc3\x28', 1)


def _too_large(rng: random.Random, doc: dict[str, Any]) -> bytes:
    doc["attributes"] = {"blob": "z" * rng.randint(65_536, 70_000)}
    return _as_json(doc)


# (weight, mutation): most mutate a realistic position a little, as a buggy upstream would.
MUTATIONS: list[tuple[int, Callable[[random.Random, dict[str, Any]], bytes]]] = [
    (14, _odd_field), (8, _drop_required), (10, _out_of_range), (10, _set("timestamp", ODD_TIMESTAMPS)),
    (6, _set("device_id", ODD_DEVICE_IDS)), (12, _set("attributes", ODD_ATTRIBUTES)), (10, _truncate),
    (10, _flip_bytes), (6, _random_bytes), (4, _not_an_object), (3, _lone_surrogate), (3, _bad_utf8),
    (1, _too_large),
]


def mutated_entries(n: int, seed: int) -> list[dict[bytes, bytes]]:
    """``n`` entries, each a position of its own broken one way, or no payload at all (1 in 100)."""
    rng = random.Random(seed)
    weights = [w for w, _ in MUTATIONS]
    out: list[dict[bytes, bytes]] = []
    for doc in Fleet(300, seed=seed).positions(n):
        roll = rng.random()
        if roll < 0.005:
            out.append({b"source": b"tcp-ingestion"})  # no payload field
        elif roll < 0.01:
            out.append({b"payload": _as_json(doc), **{b"f%d" % i: b"x" for i in range(64)}})  # 65 fields
        else:
            [mutate] = rng.choices([m for _, m in MUTATIONS], weights)
            out.append({b"payload": mutate(rng, dict(doc))})
    return out


def test_10000_broken_payloads_among_10000_valid_ones(fault_env, redis_client, pg_url, keys):
    valid = [{b"payload": p} for p in Fleet(300, seed=10).payloads(VALID)]
    broken = mutated_entries(INVALID, seed=11)
    entries = valid + broken
    random.Random(12).shuffle(entries)
    decoded = [DECODER.decode(e) for e in entries]
    expected = Counter(r.reason for r in decoded if not isinstance(r, Position))
    # A mutation that still decodes is a valid position and must be written like the others (some
    # mutants share a key, e.g. two devices renamed "x" reporting at the same ms: one row for both).
    stored = {(r.device_id, r.ts) for r in decoded if isinstance(r, Position)}
    assert VALID < len(stored) < VALID + INVALID // 10, len(stored)
    assert set(expected) == set(REASONS) - {DB_REJECTED, MAX_DELIVERIES}, "every reason of the decoder"
    # Short reclaim and few deliveries: a row PostgreSQL refused would surface as a db_rejected dead letter.
    env, metrics = with_metrics(dict(fault_env, RECLAIM_IDLE_MS="1000", MAX_DELIVERIES="2", BATCH_SIZE="500"))
    with ServiceProcess(env) as proc:
        proc.wait_for_log("processor ready")
        published = publish_entries(redis_client, keys["stream"], entries)
        wait_or_explain(proc, lambda: redis_client.xlen(keys["dead"]) >= sum(expected.values())
                        and pending_count(redis_client, keys["stream"], keys["group"]) == 0
                        and row_count(pg_url) == len(stored), 120, 0.2, "every entry settled")
        by_reason = {r: scrape(metrics, "processor_records_dead_lettered_total", {"reason": r}) for r in expected}
        assert proc.proc.poll() is None, proc.output
        proc.signal(signal.SIGTERM)
        assert proc.wait(20) == 0
        assert len(log_entries(proc, "processor starting")) == 1  # one process, never restarted
    outcome = assert_nothing_lost(redis_client, pg_url, keys, published)
    print(f"measured: {outcome.rows} rows, dead letters {outcome.dead_letters}")
    assert outcome.rows == len(stored)
    assert outcome.dead_letters == expected
    assert by_reason == outcome.dead_letters
