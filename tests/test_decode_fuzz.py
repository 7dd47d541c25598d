"""Seeded fuzz test of the decoder: 100,000 random and mutated entries, never an exception.

Every result must be a Position or a Rejection with a known reason; every Position must
satisfy the contract's invariants. Python's ``random`` with a fixed seed: a failure
reproduces exactly (the failing case index and payload are in the assertion message).
"""

from __future__ import annotations

import base64
import logging
import random
import re
from collections import Counter
from datetime import datetime, timedelta, timezone
from typing import Any, Callable

import orjson
import pytest

from processor.core import types
from processor.core.decode import Decoder, dumps_attributes
from processor.core.types import Position, Rejection

SEED = 20240501
CASES = 100_000
NOW = 1_714_564_800.0  # 2024-05-01T12:00:00Z
UTC = timezone.utc
MIN_TS = datetime(2000, 1, 1, tzinfo=UTC)
MAX_TS = datetime.fromtimestamp(NOW + 86400, UTC)
DECODER_REASONS = set(types.REASONS) - {types.DB_REJECTED, types.MAX_DELIVERIES}
DEVICE_ID_FORBIDDEN = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f]")

INTERESTING_NUMBERS = [0, -0.0, 1, -1, 0.5, 2, 2.0, 5.0, 90, -90, 90.0000001, 180, -180.5, 255, 256, 360, 360.5,
                       2147483647, 2147483648, 2**53, 2**53 - 1, 2**63 - 1, -(2**63), 2**64 - 1, 1e-50, 1e-45,
                       3.4e38, 3.5e38, 1e308, -1e308, 946684800000, 946684799999, int(NOW * 1000),
                       int(NOW * 1000) + 86400_000, int(NOW * 1000) + 86400_001]
INTERESTING_STRINGS = ["", "x", "356307042441013", "\x00", "a\\u0000", "\t", "\n", "\r", "\x7f", "\x85", "é",
                       "\U0001f600", "__", "__bigint", "Buffer", "x" * 64, "x" * 65, "2024-05-01T10:15:30Z",
                       "2024-05-01T10:15:30", "2024-05-01T10:15:30.123456789+05:30", "1999-12-31T23:59:59Z",
                       "9999-12-31T23:59:59-01:00", "AQID/w==", "QQ", "-9007199254740992", "007", "+5", "NaN"]
# Raw JSON snippets orjson.dumps cannot produce, spliced into payloads by mutation.
RAW_TOKENS = [b"NaN", b"Infinity", b"-Infinity", b"1e400", b"-1e400", b'"\\u0000"', b'"\\\\u0000"', b'"\\ud800"',
              b"\xff", b"\xc0\x80", b"\xed\xa0\x80", b"\x00", b"123456789012345678901234567890", b"[" * 40,
              b"{" * 40, b'{"__bigint":"1"}', b'{"__buffer":"QQ=="}', b'{"__x":1}', b"null", b"true", b",", b":"]


def random_string(rng: random.Random) -> str:
    roll = rng.random()
    if roll < 0.5:
        return rng.choice(INTERESTING_STRINGS)
    alphabet = "abc019_-:.TZ+ \t\n\\\"\x00\x01\x1f\x7f\x9f\xa0é€\U0001f600"
    return "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 12)))


def random_number(rng: random.Random) -> int | float:
    roll = rng.random()
    if roll < 0.4:
        return rng.choice(INTERESTING_NUMBERS)
    if roll < 0.7:
        return rng.randint(-(2**63), 2**64 - 1) if rng.random() < 0.2 else rng.randint(-1000, 1000)
    return rng.uniform(-400, 400) if rng.random() < 0.8 else rng.uniform(-1e300, 1e300)


def random_sentinel(rng: random.Random, depth: int) -> dict[str, Any]:
    kind = rng.randrange(6)
    if kind == 0:
        digits = rng.choice([str(rng.randint(-(2**70), 2**70)), str(2**53), str(-(2**53)), "9" * rng.randint(1, 102),
                             "12a", "", "-", "+1", " 1", "0" * 5 + "42"])
        return {"__bigint": digits if rng.random() < 0.9 else random_value(rng, depth + 1)}
    if kind == 1:
        text = base64.b64encode(rng.randbytes(rng.randint(0, 12))).decode()
        if rng.random() < 0.3:
            text = text[: rng.randint(0, len(text))] + rng.choice(["", "=", " ", "\n", "_", "é"])
        return {"__buffer": text if rng.random() < 0.9 else random_value(rng, depth + 1)}
    if kind == 2:
        data: Any = [rng.randint(0, 255) for _ in range(rng.randint(0, 8))]
        if rng.random() < 0.3:
            data.append(rng.choice([256, -1, 1.0, True, "1", None, [1]]))
        return {"type": "Buffer", "data": data if rng.random() < 0.9 else random_value(rng, depth + 1)}
    if kind == 3:
        return {rng.choice(["__date", "__", "__map", "__BigInt"]): random_value(rng, depth + 1)}
    if kind == 4:  # sentinel-like but with an extra key: a plain object
        return {"__bigint": "1", "x": random_value(rng, depth + 1)}
    return {"type": rng.choice(["Buffer", "buffer"]), "data": [1], **({"x": 1} if rng.random() < 0.5 else {})}


def random_value(rng: random.Random, depth: int = 0) -> Any:
    roll = rng.random()
    if depth > 40 or roll < 0.3:
        return random_number(rng)
    if roll < 0.55:
        return random_string(rng)
    if roll < 0.62:
        return rng.choice([True, False, None])
    if roll < 0.75:
        return random_sentinel(rng, depth)
    if roll < 0.88:
        return [random_value(rng, depth + 1) for _ in range(rng.randint(0, 3))]
    return {random_string(rng): random_value(rng, depth + 1) for _ in range(rng.randint(0, 3))}


def deep_value(rng: random.Random) -> Any:
    value: Any = random_value(rng, 41)
    for _ in range(rng.choice([30, 31, 32, 33, 40, 200])):
        value = [value] if rng.random() < 0.5 else {"k": value}
    return value


def valid_doc(rng: random.Random) -> dict[str, Any]:
    ms = rng.randint(946684800000, int(NOW * 1000) + 86400_000)
    doc: dict[str, Any] = {
        "device_id": str(rng.randint(10**14, 10**15 - 1)),
        "timestamp": ms if rng.random() < 0.5 else
        (datetime(1970, 1, 1, tzinfo=UTC) + timedelta(milliseconds=ms)).isoformat().replace("+00:00", "Z"),
        "latitude": rng.uniform(-90, 90),
        "longitude": rng.uniform(-180, 180),
        "altitude": rng.uniform(-100, 3000),
        "angle": rng.uniform(0, 360),
        "speed": rng.uniform(0, 200),
        "satellites": rng.randint(0, 255),
        "priority": rng.randint(0, 2),
        "event_id": rng.randint(0, 500),
        "attributes": {str(rng.randint(1, 500)): random_value(rng, 1) for _ in range(rng.randint(0, 8))},
    }
    return doc


def field_value(rng: random.Random) -> Any:
    roll = rng.random()
    if roll < 0.1:
        return deep_value(rng)
    if roll < 0.2:
        return random_sentinel(rng, 0)
    return random_value(rng, 0)


def mutate_doc(rng: random.Random, doc: dict[str, Any]) -> dict[str, Any]:
    for _ in range(rng.randint(1, 3)):
        field = rng.choice(list(doc) + ["extra", random_string(rng)])
        roll = rng.random()
        if roll < 0.2:
            doc.pop(field, None)
        elif roll < 0.3:
            doc[field] = None
        else:
            doc[field] = field_value(rng)
    return doc


def mutate_bytes(rng: random.Random, raw: bytes) -> bytes:
    data = bytearray(raw)
    for _ in range(rng.randint(1, 4)):
        roll = rng.random()
        position = rng.randint(0, len(data))
        if roll < 0.3 and data:
            data[min(position, len(data) - 1)] ^= 1 << rng.randrange(8)
        elif roll < 0.5:
            del data[position:]
        elif roll < 0.85:
            data[position:position] = rng.choice(RAW_TOKENS)
        else:
            data[position:position] = rng.randbytes(rng.randint(1, 4))
    return bytes(data)


def make_fields(rng: random.Random) -> Any:
    roll = rng.random()
    if roll < 0.01:
        return rng.choice([None, {}, {b"other": b"1"}, {b"payload": b""}, {b"payload": None}, [], "payload"])
    doc = valid_doc(rng)
    if roll < 0.3:
        payload = orjson.dumps(doc)
    elif roll < 0.65:
        payload = orjson.dumps(mutate_doc(rng, doc))
    elif roll < 0.95:
        payload = mutate_bytes(rng, orjson.dumps(doc))
    else:
        payload = orjson.dumps(rng.choice([random_value(rng), deep_value(rng)]))
    fields: dict[Any, Any] = {b"payload": payload}
    if rng.random() < 0.02:
        fields.update({f"f{i}".encode(): b"" for i in range(rng.choice([10, 63, 64, 100]))})
    return fields


def check_no_nul_and_no_sentinel(value: Any, depth: int = 1) -> None:
    """Decoded attributes: no U+0000, no sentinel shape left, no container deeper than 32 levels."""
    stack = [(value, depth)]
    while stack:
        node, level = stack.pop()
        assert level <= 32
        items = node.items() if isinstance(node, dict) else enumerate(node)
        if isinstance(node, dict):
            assert not (len(node) == 1 and next(iter(node)).startswith("__")), node
            assert not (len(node) == 2 and node.get("type") == "Buffer" and "data" in node), node
        for key, item in items:
            assert not (isinstance(key, str) and "\x00" in key)
            if isinstance(item, str):
                assert "\x00" not in item
            elif isinstance(item, (dict, list)):
                stack.append((item, level + 1))
            else:
                assert item is None or type(item) in (bool, int, float), item


def check_optional_real(value: Any, low: float, high: float) -> None:
    if value is not None:
        assert type(value) is float and low <= value <= high, value
        assert value == 0 or abs(value) >= 1e-45


def check_optional_int(value: Any, low: int, high: int) -> None:
    if value is not None:
        assert type(value) is int and low <= value <= high, value


def check_position(position: Position) -> None:
    assert type(position.device_id) is str and 1 <= len(position.device_id) <= 64
    assert not DEVICE_ID_FORBIDDEN.search(position.device_id)
    assert position.ts.tzinfo is not None and position.ts.utcoffset() == timedelta(0)
    assert MIN_TS <= position.ts <= MAX_TS
    assert type(position.latitude) is float and -90 <= position.latitude <= 90
    assert type(position.longitude) is float and -180 <= position.longitude <= 180
    check_optional_real(position.altitude, -3.4e38, 3.4e38)
    check_optional_real(position.angle, 0, 360)
    check_optional_real(position.speed, 0, 3.4e38)
    check_optional_int(position.satellites, 0, 255)
    check_optional_int(position.priority, 0, 2)
    check_optional_int(position.event_id, 0, 2147483647)
    assert position.attributes is None or type(position.attributes) is dict
    text = dumps_attributes(position.attributes)
    assert orjson.loads(text) == (position.attributes or {})  # JSON-serialisable, round-trips
    if position.attributes:
        check_no_nul_and_no_sentinel(position.attributes)


def run_fuzz(seed: int, cases: int, check: Callable[[Position], None]) -> Counter[str]:
    rng = random.Random(seed)
    decoder = Decoder()
    outcomes: Counter[str] = Counter()
    for case in range(cases):
        fields = make_fields(rng)
        result = decoder.decode(fields, now=NOW)
        context = f"case {case}: {fields!r:.300}"
        if isinstance(result, Position):
            outcomes["position"] += 1
            try:
                check(result)
            except AssertionError as exc:
                raise AssertionError(f"{context}: {result!r:.300}: {exc}") from exc
        else:
            assert isinstance(result, Rejection), context
            assert result.reason in DECODER_REASONS, context
            assert type(result.detail) is str and 0 < len(result.detail) <= 200, context
            outcomes[result.reason] += 1
    return outcomes


def test_fuzz_decoder_never_raises_and_keeps_invariants(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.ERROR, logger="processor.core.decode"):
        outcomes = run_fuzz(SEED, CASES, check_position)
    # The safety net in decode() (an unexpected exception) must never have been used.
    assert [record.getMessage() for record in caplog.records] == []
    assert sum(outcomes.values()) == CASES
    # The generator reaches every outcome: a fuzz run that only makes invalid JSON proves little.
    assert set(outcomes) == DECODER_REASONS | {"position"}, outcomes
    assert outcomes["position"] > CASES // 10, outcomes
