"""The simulator: plausible tracks, valid payloads with every sentinel, exact counts on the stream."""

from __future__ import annotations

import base64
import itertools
import math
import re
import threading
import time
from collections import Counter, defaultdict
from datetime import datetime
from typing import Any

import orjson
import pytest

from processor.simulate import Fleet, imei, iso_ms, publish, run_simulation

START_MS = 1_700_000_000_000  # 2023-11-14T22:13:20Z: far enough back that no timestamp is capped


def _ms(timestamp: int | str) -> int:
    if isinstance(timestamp, int):
        return timestamp
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", timestamp), timestamp
    return int(datetime.fromisoformat(timestamp).timestamp() * 1000)


def _luhn_ok(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch) * (2 if i % 2 else 1)
        total += d - 9 if d > 9 else d
    return total % 10 == 0


def _haversine_m(a: dict[str, Any], b: dict[str, Any]) -> float:
    lat1, lat2 = math.radians(a["latitude"]), math.radians(b["latitude"])
    dlat, dlon = lat2 - lat1, math.radians(b["longitude"] - a["longitude"])
    h = math.sin(dlat / 2) ** 2 + math.cos(lat1) * math.cos(lat2) * math.sin(dlon / 2) ** 2
    return 2 * 6_371_000 * math.asin(math.sqrt(h))


# --- the fleet ---

def test_device_ids_are_unique_imei_like_and_follow_the_seed() -> None:
    positions = list(Fleet(50, seed=7, start_ms=START_MS).positions(50))
    ids = [p["device_id"] for p in positions]
    assert len(set(ids)) == 50
    assert all(re.fullmatch(r"35\d{13}", i) and _luhn_ok(i) for i in ids)
    assert ids == [p["device_id"] for p in Fleet(50, seed=7, start_ms=START_MS).positions(50)]
    assert ids != [p["device_id"] for p in Fleet(50, seed=8, start_ms=START_MS).positions(50)]
    assert imei(0, 0) == "350000000000006"  # Luhn: 3 + (5 x 2 -> 1) + 6 = 10
    assert imei(10**12 - 1, 2) == "350000000000014"  # wraps, keeps 15 digits


def test_payloads_are_deterministic_with_a_seed_and_continue_across_calls() -> None:
    one = Fleet(9, seed=42, start_ms=START_MS)
    two = Fleet(9, seed=42, start_ms=START_MS)
    first = list(one.payloads(1000))
    assert first == list(two.payloads(600)) + list(two.payloads(400))
    assert first != list(Fleet(9, seed=43, start_ms=START_MS).payloads(1000))
    assert [orjson.loads(p) for p in first[:5]] == list(Fleet(9, seed=42, start_ms=START_MS).positions(5))


def test_round_robin_with_strictly_increasing_timestamps_about_a_second_apart() -> None:
    positions = list(Fleet(13, seed=1, start_ms=START_MS).positions(13 * 300))
    by_device: dict[str, list[int]] = defaultdict(list)
    for i, p in enumerate(positions):
        assert p["device_id"] == positions[i % 13]["device_id"]
        by_device[p["device_id"]].append(_ms(p["timestamp"]))
    assert sorted(len(ts) for ts in by_device.values()) == [300] * 13
    for ts in by_device.values():
        steps = [b - a for a, b in itertools.pairwise(ts)]
        assert min(steps) >= 800 and max(steps) <= 1200, (min(steps), max(steps))
        assert abs(ts[0] - START_MS) <= 200


def test_default_start_puts_nothing_in_the_future() -> None:
    before = int(time.time() * 1000)
    positions = list(Fleet(10, seed=2).positions(10_000))
    after = int(time.time() * 1000)
    stamps = [_ms(p["timestamp"]) for p in positions]
    assert max(stamps) <= after
    # 1000 reports a device, at most 1.2 s apart; the first up to 0.2 s before the start
    assert min(stamps) >= before - 1000 * 1200 - 200
    last_by_device = {p["device_id"]: _ms(p["timestamp"]) for p in positions}
    assert all(ts >= before - 300_000 for ts in last_by_device.values())  # and the last ones about now


def test_a_fleet_that_would_run_ahead_of_the_clock_is_held_at_now() -> None:
    now = int(time.time() * 1000)
    positions = list(Fleet(2, seed=3, start_ms=now - 5_000).positions(2_000))
    stamps: dict[str, list[int]] = defaultdict(list)
    for p in positions:
        stamps[p["device_id"]].append(_ms(p["timestamp"]))
    end = int(time.time() * 1000)
    for ts in stamps.values():
        steps = [b - a for a, b in itertools.pairwise(ts)]
        assert min(steps) >= 1
        # Past the first few seconds the clock holds them back: 1000 reports in far less
        # than 1000 s. Strictly increasing milliseconds can pass the clock by at most 1 ms a report.
        assert ts[-1] - ts[0] < 10_000
        assert ts[-1] <= end + len(ts)


def test_tracks_move_plausibly() -> None:
    positions = list(Fleet(20, seed=5, start_ms=START_MS).positions(20 * 200))
    last: dict[str, dict[str, Any]] = {}
    moved = 0.0
    for p in positions:
        assert -90 <= p["latitude"] <= 90 and -180 <= p["longitude"] <= 180
        assert 0 <= p["speed"] <= 120 and 0 <= p["angle"] <= 359
        assert 0 <= p["satellites"] <= 20 and p["priority"] in (0, 1, 2) and p["event_id"] >= 0
        assert isinstance(p["altitude"], int)
        previous = last.get(p["device_id"])
        if previous is not None:
            dt = (_ms(p["timestamp"]) - _ms(previous["timestamp"])) / 1000
            distance = _haversine_m(previous, p)
            assert distance <= 120 / 3.6 * dt + 1, (distance, dt)  # never faster than 120 km/h
            moved += distance
        last[p["device_id"]] = p
    assert moved > 20 * 200 * 5  # on average more than 5 m a report: they do drive
    speeds = Counter(p["speed"] == 0 for p in positions)
    assert speeds[True] > 0 and speeds[False] > speeds[True]  # mostly moving, sometimes standing


def test_field_mix_and_sentinels() -> None:
    positions = list(Fleet(20, seed=11, start_ms=START_MS).positions(5_000))
    kinds = Counter(type(p["timestamp"]).__name__ for p in positions)
    assert kinds["int"] > kinds["str"] > 0.15 * len(positions)
    assert Counter(p["priority"] for p in positions).most_common(1)[0][0] == 0
    assert Counter(p["event_id"] for p in positions).most_common(1)[0][0] == 0
    assert any(p["satellites"] == 0 for p in positions)
    assert 0.9 * len(positions) <= sum(p["satellites"] > 0 for p in positions) < len(positions)
    bigints = [int(v["__bigint"]) for p in positions for v in p["attributes"].values()
               if isinstance(v, dict) and "__bigint" in v]
    assert any(b > 2**53 for b in bigints) and any(b < 2**53 for b in bigints)
    buffers = [p["attributes"]["385"] for p in positions]
    b64 = [b["__buffer"] for b in buffers if "__buffer" in b]
    node = [b for b in buffers if b.get("type") == "Buffer"]
    assert len(b64) + len(node) == len(positions)
    assert 0 < len(node) < 0.1 * len(positions)
    assert all(base64.b64decode(s, validate=True) for s in b64)
    assert all(all(0 <= x <= 255 for x in b["data"]) for b in node)
    assert all(9 <= len(p["attributes"]) <= 12 for p in positions)


def test_payload_sizes() -> None:
    sizes = [len(p) for p in Fleet(20, seed=13).payloads(20_000)]
    assert min(sizes) >= 200 and max(sizes) <= 450, (min(sizes), max(sizes))
    assert 250 <= sum(sizes) / len(sizes) <= 400


def test_every_payload_decodes() -> None:
    try:
        from processor.core.decode import Decoder
        from processor.core.types import Position
    except ImportError as exc:
        pytest.skip(f"the decoder is not there yet: {exc}")
    decoder = Decoder()
    results = [decoder.decode({b"payload": p}) for p in Fleet(30, seed=17).payloads(10_000)]
    rejected = Counter(getattr(r, "reason", None) for r in results if not isinstance(r, Position))
    assert rejected == Counter()
    iccids = {r.attributes["11"] for r in results}
    assert all(isinstance(v, str) and int(v) > 2**53 for v in iccids)  # kept exact, as a string
    assert all(isinstance(r.attributes["16"], int) for r in results)
    assert all(re.fullmatch(r"[0-9a-f]+", r.attributes["385"]) for r in results)


def test_iso_ms_formats_utc_with_milliseconds() -> None:
    assert iso_ms(0) == "1970-01-01T00:00:00.000Z"
    assert iso_ms(1_700_000_000_123) == "2023-11-14T22:13:20.123Z"


# --- publishing ---

def test_publish_adds_every_payload_in_order(redis_client, keys) -> None:
    payloads = [f'{{"n":{i}}}'.encode() for i in range(1001)]
    assert publish(redis_client, keys["stream"], payloads, pipeline_size=100) == 1001
    entries = redis_client.xrange(keys["stream"])
    assert [fields for _, fields in entries] == [{b"payload": p} for p in payloads]


def test_run_simulation_publishes_the_exact_count(redis_client, keys) -> None:
    lines: list[str] = []
    published = run_simulation(redis_client, keys["stream"], devices=7, rate=None, duration=None, count=1234,
                               stop=threading.Event(), progress=lines.append, seed=1)
    assert published == 1234
    assert redis_client.xlen(keys["stream"]) == 1234
    assert re.fullmatch(rf"simulate: published 1234 positions \(\d+/s\) to {re.escape(keys['stream'])}",
                        lines[-1])
    positions = [orjson.loads(f[b"payload"]) for _, f in redis_client.xrange(keys["stream"])]
    per_device = Counter(p["device_id"] for p in positions)
    assert sorted(per_device.values()) == [176] * 5 + [177] * 2  # 1234 = 7 x 176 + 2
    now = int(time.time() * 1000)
    assert max(_ms(p["timestamp"]) for p in positions) <= now


def test_run_simulation_keeps_the_rate_and_stamps_reports_with_the_time(redis_client, keys) -> None:
    start_ms = int(time.time() * 1000)
    started = time.monotonic()
    published = run_simulation(redis_client, keys["stream"], devices=5, rate=100, duration=None, count=60,
                               stop=threading.Event(), progress=lambda line: None)
    elapsed = time.monotonic() - started
    assert published == 60 == redis_client.xlen(keys["stream"])
    assert 0.55 <= elapsed < 10  # the 60th position is due 0.59 s in
    stamps = [_ms(orjson.loads(f[b"payload"])["timestamp"]) for _, f in redis_client.xrange(keys["stream"])]
    assert start_ms <= min(stamps) and max(stamps) <= int(time.time() * 1000)


def test_run_simulation_stops_on_the_event_or_the_duration(redis_client, keys) -> None:
    stop = threading.Event()
    stop.set()
    assert run_simulation(redis_client, keys["stream"], devices=3, rate=None, duration=None, count=None,
                          stop=stop, progress=lambda line: None) == 0
    assert redis_client.exists(keys["stream"]) == 0

    stop = threading.Event()
    timer = threading.Timer(0.3, stop.set)
    timer.start()
    try:
        published = run_simulation(redis_client, keys["stream"], devices=3, rate=None, duration=None,
                                   count=None, stop=stop, progress=lambda line: None)
    finally:
        timer.cancel()
    assert published > 0
    assert redis_client.xlen(keys["stream"]) == published

    redis_client.delete(keys["stream"])
    published = run_simulation(redis_client, keys["stream"], devices=3, rate=50, duration=0.3, count=None,
                               stop=threading.Event(), progress=lambda line: None)
    assert 1 <= published <= 16  # 50/s for 0.3 s: 15 are due, plus the one due at t=0
    assert redis_client.xlen(keys["stream"]) == published
