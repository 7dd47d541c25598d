"""The decoder's compiled way (processor/core/_speedups.c) against its Python ways.

For every entry the compiled way either declines (None: the Python ways decide) or gives
exactly the Position the Python ways give, and the row of COPY text the writer would make
of that Position, byte for byte. Checked on the fuzz test's 100,000 entries, on realistic
payloads, on every boundary the C file's header names (each with whether the compiled way
takes it: one that declined everything would pass the comparisons and buy nothing), on
random numbers, timestamps and sentinels, and in PostgreSQL: the rows it makes are stored
exactly as the writer's own.
"""

from __future__ import annotations

import base64
import random
import string
import sys
from datetime import datetime, timezone
from typing import Any

import orjson
import pytest

from processor.core import decode as decode_module
from processor.core import writer as writer_module
from processor.core.decode import MIN_EPOCH_MS, Decoder
from processor.core.types import INSERTED, Position, Record
from processor.core.writer import Writer
from processor.simulate import Fleet
from tests.conftest import _in_ci
from tests.test_decode_fuzz import NOW, RAW_TOKENS, SEED, make_fields

speedups = decode_module._speedups
pytestmark = pytest.mark.skipif(speedups is None and not _in_ci(), reason="the compiled way is not built here "
                                "(no C compiler at install); CI requires it")

PYTHON = Decoder(compiled=False)
LATEST_MS = PYTHON._window(NOW)[1]
BASE: dict[str, Any] = {
    "device_id": "356307042441013", "timestamp": 1714558530250, "latitude": 54.6872, "longitude": 25.2797,
    "altitude": 112, "angle": 90, "speed": 42, "satellites": 12, "priority": 1, "event_id": 0,
    "attributes": {"239": 1, "16": {"__bigint": "37543850"}, "385": {"__buffer": "AQID"}},
}


def compiled(entries: list[Any], latest_ms: int = LATEST_MS) -> tuple[list[Any], list[Any]]:
    return speedups.decode_batch(entries, 65536, latest_ms, Position)


def writer_row(position: Position) -> bytes:
    return writer_module._copy_text([Record("0-0", position)], numbered=False)


def check(entries: list[Any], context: Any = "") -> list[bool]:
    """The compiled way against the Python ways, entry by entry; which entries it took."""
    positions, rows = compiled(entries)
    reference = PYTHON.decode_batch(entries, NOW)
    taken = []
    for i, (position, row, expected) in enumerate(zip(positions, rows, reference)):
        if position is None:
            assert row is None
            taken.append(False)
            continue
        where = f"{context} entry {i}: {entries[i]!r:.300}"
        assert isinstance(expected, Position), f"{where}: the compiled way took what the Python ways reject: {expected}"
        assert type(position) is Position, where
        assert repr(position) == repr(expected), f"{where}\n compiled {position!r}\n python   {expected!r}"
        assert row == writer_row(expected), f"{where}\n compiled {row!r}\n writer   {writer_row(expected)!r}"
        taken.append(True)
    return taken


def payload(**fields: Any) -> bytes:
    """BASE with some fields replaced (OMIT: left out); a value given as ``Raw(...)``, at any depth,
    goes in as that JSON text."""
    raws: list[bytes] = []

    def placeholder(value: Any) -> str:
        if not isinstance(value, Raw):
            raise TypeError(value)
        raws.append(value.text)
        return f"@raw{len(raws) - 1}@"

    doc = {name: value for name, value in {**BASE, **fields}.items() if value is not OMIT}
    text = orjson.dumps(doc, default=placeholder)
    for i, raw in enumerate(raws):
        text = text.replace(f'"@raw{i}@"'.encode(), raw)
    return text


class Raw:
    def __init__(self, text: str | bytes) -> None:
        self.text = text.encode() if isinstance(text, str) else text


OMIT = object()


def entry(text: bytes) -> dict[bytes, bytes]:
    return {b"payload": text}


def test_the_compiled_way_is_built() -> None:
    # Skipped above where it was not built, except in CI: there it must be.
    assert speedups is not None
    assert Decoder().compiled and not PYTHON.compiled


def test_realistic_payloads_are_all_taken_and_agree() -> None:
    payloads = list(Fleet(500, seed=13, start_ms=int(NOW * 1000) - 86_400_000).payloads(5000))
    taken = check([entry(p) for p in payloads], "fleet")
    assert all(taken)
    # as compact as the Python ways' (device state keeps 100,000 of them: the benchmark's memory target)
    positions, _ = compiled([entry(payloads[0])])
    python, = PYTHON.decode_batch([entry(payloads[0])], NOW)
    assert sys.getsizeof(positions[0].attributes) == sys.getsizeof(python.attributes)
    # Fleet's payloads hold every sentinel kind, and ISO as well as integer timestamps.
    assert any(b'"type":"Buffer"' in p for p in payloads) and any(b'Z"' in p for p in payloads)


def test_the_fuzz_corpus_agrees() -> None:
    # Its valid documents carry Python's 17-digit floats, beyond the compiled way's 15 digits: it takes
    # none of them, and must never take any of the corpus's invalid and unusual entries either.
    rng = random.Random(SEED)
    entries = [make_fields(rng) for _ in range(100_000)]
    for start in range(0, len(entries), 1000):
        check(entries[start:start + 1000], f"fuzz batch {start}")


# Mutations of realistic payloads, for the compiled way's own parser: tokens of the wire format,
# of JSON and of the fuzz test spliced in, bytes flipped, dropped or cut.
TOKENS = [*RAW_TOKENS, b" ", b"\t", b"\n", b'"', b"\\", b"{}", b"[]", b"0", b"-", b".", b"e", b"1.50", b"-0",
          b"90.0", b"1e-5", b"Z", b"T", b"=", b"==", b'"__bigint"', b'"__buffer"', b'"type"', b'"data"',
          b'"Buffer"', b'"device_id"', b'"timestamp"', b'"latitude"', b'"attributes"', b"\xc3\xa9", b"\\t", b"\\u0041"]


def mutate(rng: random.Random, raw: bytes) -> bytes:
    data = bytearray(raw)
    for _ in range(rng.randint(1, 3)):
        if not data:
            break
        roll = rng.random()
        at = rng.randint(0, len(data) - 1)
        if roll < 0.25:
            data[at] ^= 1 << rng.randrange(7)
        elif roll < 0.45:
            del data[at:at + rng.randint(1, 3)]
        elif roll < 0.55:
            data[at:at] = data[at:at + rng.randint(1, 6)]  # a few bytes twice
        elif roll < 0.6:
            del data[at:]
        else:
            data[at:at] = rng.choice(TOKENS)
    return bytes(data)


def test_mutated_realistic_payloads_agree() -> None:
    rng = random.Random(SEED + 6)
    payloads = list(Fleet(200, seed=17, start_ms=int(NOW * 1000) - 86_400_000).payloads(2000))
    entries = [entry(mutate(rng, rng.choice(payloads))) for _ in range(100_000)]
    taken = 0
    for start in range(0, len(entries), 1000):
        taken += sum(check(entries[start:start + 1000], f"mutations batch {start}"))
    # What a mutation leaves valid and usual (a digit changed, a byte of a string), it takes.
    assert 3_000 < taken < 20_000, taken


# (case, payload, taken by the compiled way)
BOUNDARIES: list[tuple[str, bytes, bool]] = [
    ("base", payload(), True),
    # floats: repr must write exactly the literal's digits (or them and ".0")
    *[(f"latitude {text}", payload(latitude=Raw(text)), taken) for text, taken in [
        ("54", True), ("54.0", True), ("54.00", False), ("54.5", True), ("54.50", False), ("-54.5", True),
        ("0", True), ("0.0", True), ("-0", False), ("-0.0", False), ("0.0001", True), ("0.00012", True),
        ("0.00001", False), ("0.000", False), ("1e1", False), ("1E1", False), ("5.4e1", False), ("54.", False),
        (".5", False), ("054.5", False), ("-", False), ("90", True), ("90.0", True), ("-90", True),
        ("90.000000000001", False), ("12.3456789012345", True), ("12.34567890123456", False),
        ("0.123456789012345", True), ("0.0001234567890123", True), ("0.0001234567890123456", False),
        ("NaN", False), ("null", False), ('"54.5"', False), ("true", False)]],
    *[(f"longitude {text}", payload(longitude=Raw(text)), taken) for text, taken in [
        ("180", True), ("-180.0", True), ("180.5", False), ("-179.9999999", True)]],
    *[(f"altitude {text}", payload(altitude=Raw(text)), taken) for text, taken in [
        ("112.5", True), ("-0.5", True), ("-12", True), ("123456789012345", True), ("1234567890123456", False),
        ("null", True), ("1.5e3", False)]],
    *[(f"angle {text}", payload(angle=Raw(text)), taken) for text, taken in [
        ("360", True), ("360.0", True), ("360.5", False), ("-1", False), ("0", True), ("null", True)]],
    *[(f"speed {text}", payload(speed=Raw(text)), taken) for text, taken in [
        ("0", True), ("0.5", True), ("-1", False), ("-0.5", False), ("null", True)]],
    ("optional reals absent", payload(altitude=OMIT, angle=OMIT, speed=OMIT), True),
    # integers
    *[(f"satellites {text}", payload(satellites=Raw(text)), taken) for text, taken in [
        ("0", True), ("255", True), ("256", False), ("-1", False), ("-0", False), ("12.0", False), ("1e1", False),
        ("012", False), ("null", True), ('"12"', False)]],
    *[(f"priority {text}", payload(priority=Raw(text)), taken) for text, taken in [("2", True), ("3", False)]],
    *[(f"event_id {text}", payload(event_id=Raw(text)), taken) for text, taken in [
        ("2147483647", True), ("2147483648", False), ("null", True)]],
    ("optional integers absent", payload(satellites=OMIT, priority=OMIT, event_id=OMIT), True),
    # timestamps: the window, and tcp-ingestion's ISO form only
    *[(f"timestamp {text}", payload(timestamp=Raw(text)), taken) for text, taken in [
        (str(MIN_EPOCH_MS), True), (str(MIN_EPOCH_MS - 1), False), (str(LATEST_MS), True),
        (str(LATEST_MS + 1), False), ("1714558530250.0", False), ("-1", False), ("1234567890123456789", False),
        ("null", False), ("true", False)]],
    *[(f"timestamp {text}", payload(timestamp=text), taken) for text, taken in [
        ("2024-05-01T10:15:30.250Z", True), ("2024-05-01T10:15:30.000Z", True), ("2024-02-29T23:59:59.999Z", True),
        ("2000-01-01T00:00:00.000Z", True), ("1999-12-31T23:59:59.999Z", False), ("2023-02-29T00:00:00.000Z", False),
        ("2100-02-29T00:00:00.000Z", False), ("2024-05-01T24:00:00.000Z", False), ("2024-05-01T10:60:00.000Z", False),
        ("2024-05-01T10:15:60.000Z", False), ("2024-13-01T00:00:00.000Z", False), ("2024-00-01T00:00:00.000Z", False),
        ("2024-05-00T00:00:00.000Z", False), ("2024-04-31T00:00:00.000Z", False), ("2024-05-01T10:15:30.25Z", False),
        ("2024-05-01T10:15:30Z", False), ("2024-05-01T10:15:30.250+00:00", False), ("2024-05-01 10:15:30.250Z", False),
        ("2024-05-01T10:15:30.250z", False), ("202a-05-01T10:15:30.250Z", False), ("2024-05-02T12:00:00.001Z", False),
        ("2024-05-02T12:00:00.000Z", True)]],
    # device ids
    *[(f"device_id {text!r:.20}", payload(device_id=text), taken) for text, taken in [
        ("x" * 64, True), ("x" * 65, False), ("", False), ("abc-123", False), ("ABCdef123", True), ("a b", False),
        (123, False), (None, False)]],
    # attributes
    ("attributes absent", payload(attributes=OMIT), True),
    ("attributes null", payload(attributes=None), True),
    ("attributes empty", payload(attributes={}), True),
    ("attributes scalars", payload(attributes={"a": True, "b": False, "c": None, "d": "text with spaces", "": 0,
                                               "e": -5, "f": 123456789012345678, "g": "~!@#$%^&*()/{}[]:,'"}), True),
    ("attributes a float", payload(attributes={"a": 1.5}), False),
    ("attributes an array", payload(attributes={"a": [1]}), False),
    ("attributes an object", payload(attributes={"a": {"b": 1}}), False),
    ("attributes an empty object inside", payload(attributes={"a": {}}), True),
    ("attributes an integer of 19 digits", payload(attributes={"a": 1234567890123456789}), False),
    ("attributes a key starting __", payload(attributes={"__x": 1, "y": 2}), False),
    ("attributes themselves a sentinel", payload(attributes={"__bigint": "1"}), False),
    ("attributes a Node Buffer", payload(attributes={"type": "Buffer", "data": "x"}), False),
    ("attributes shaped like one", payload(attributes={"type": "other", "data": "x"}), False),
    ("attributes with type alone", payload(attributes={"type": "Buffer", "x": "y"}), True),
    ("attributes a key twice", payload(attributes=Raw('{"a":1,"a":2}')), False),
    ("attributes 128 keys", payload(attributes={str(i): i for i in range(128)}), True),
    ("attributes 129 keys", payload(attributes={str(i): i for i in range(129)}), False),
    ("attributes long keys", payload(attributes={"k" * 40: 1, "k" * 41: 2}), True),
    # sentinels
    *[(f"__bigint {text!r:.30}", payload(attributes={"a": {"__bigint": text}}), taken) for text, taken in [
        ("9007199254740991", True), ("9007199254740992", True), ("0009007199254740991", True),
        ("00000000000000000009007199254740992", True), ("0", True), ("000", True), ("1" * 100, True),
        ("1" * 101, False), ("-5", False), ("", False), ("+5", False), ("1.5", False), (5, False)]],
    *[(f"__buffer {text!r}", payload(attributes={"a": {"__buffer": text}}), taken) for text, taken in [
        ("", True), ("AQID", True), ("AQI=", True), ("AQ==", True), ("AR==", False), ("AQJ=", False),
        ("AQI", False), ("A===", False), ("AQ=A", False), ("=AQI", False), ("AQ-_", False), ("AQID AQID", False),
        (1, False)]],
    *[(f"Node Buffer {text}", payload(attributes={"a": Raw(text)}), taken) for text, taken in [
        ('{"type":"Buffer","data":[1,2,255]}', True), ('{"data":[0],"type":"Buffer"}', True),
        ('{"type":"Buffer","data":[]}', True), ('{"type":"Buffer","data":[256]}', False),
        ('{"type":"Buffer","data":[-1]}', False), ('{"type":"Buffer","data":[1.0]}', False),
        ('{"type":"Buffer","data":[01]}', False), ('{"type":"Buffer"}', False), ('{"data":[1]}', False),
        ('{"type":"Buff","data":[1]}', False), ('{"type":"Buffer","data":[1],"x":1}', False),
        ('{"type":"Buffer","type":"Buffer","data":[1]}', False), ('{"type":"Buffer","data":"AQ=="}', False)]],
    ("sentinel with two keys", payload(attributes={"a": {"__buffer": "AQID", "x": 1}}), False),
    ("unknown sentinel", payload(attributes={"a": {"__other": "x"}}), False),
    # the object
    ("an unknown key", payload(extra=1), False),
    ("a key twice", payload()[:-1] + b',"priority":1}', False),
    ("required field absent", payload(latitude=OMIT), False),
    ("spaced", orjson.dumps(BASE).replace(b",", b", ").replace(b":", b": "), True),
    ("leading and trailing spaces", b"  " + payload() + b"  ", True),
    ("pretty-printed", orjson.dumps(BASE, option=orjson.OPT_INDENT_2), False),
    ("a tab between tokens", payload().replace(b",", b",\t", 1), False),
    ("trailing garbage", payload() + b"x", False),
    ("two objects", payload() + payload(), False),
    ("an array", b"[" + payload() + b"]", False),
    ("not JSON", b"{", False),
    ("empty object", b"{}", False),
    ("non-ASCII in an attribute", payload(attributes={"a": "é"}), False),
    ("an escape", payload(attributes={"a": "a/b"}).replace(b"a/b", b"a\\/b"), False),
    ("a NUL escape", payload(attributes={"a": "x"}).replace(b'"x"', b'"\\u0000"'), False),
    ("a raw control character in a string", payload(attributes={"a": "x"}).replace(b'"x"', b'"\x01"'), False),
]


@pytest.mark.parametrize("text,taken", [(p, t) for _, p, t in BOUNDARIES], ids=[c for c, _, _ in BOUNDARIES])
def test_boundaries(text: bytes, taken: bool) -> None:
    assert check([entry(text)]) == [taken], text


@pytest.mark.parametrize("fields", [
    {"payload": payload()},                              # str keys (a client that decodes responses)
    {b"payload": payload().decode()},                    # a str payload
    {b"payload": b""}, {b"payload": None}, {},           # empty or missing
    {b"payload": payload(), **{str(i).encode(): b"" for i in range(64)}},  # 65 fields
    [(b"payload", payload())], None, 5,                  # not a dict
    {b"payload": payload(attributes={"a": "x" * 70_000})},  # over max_payload_bytes
], ids=["str keys", "str payload", "empty", "None", "no fields", "65 fields", "pairs", "None fields", "int",
        "too large"])
def test_entries_it_leaves_to_the_python_ways(fields: Any) -> None:
    assert check([fields]) == [False]


def test_random_numbers_agree() -> None:
    rng = random.Random(SEED + 7)
    texts: list[str] = []
    for _ in range(20_000):
        roll = rng.random()
        value = rng.uniform(-90, 90) * 10 ** -rng.randint(0, 6)
        if roll < 0.4:
            text = repr(value)
        elif roll < 0.8:
            text = f"{value:.{rng.randint(0, 16)}f}"
        else:
            digits = "".join(rng.choice(string.digits) for _ in range(rng.randint(1, 17)))
            text = (rng.choice(["", "-"]) + rng.choice(["0", "8"]) + "." + digits)
        texts.append(text)
    entries = [entry(payload(latitude=Raw(t), altitude=Raw(t), speed=Raw(t.lstrip("-")))) for t in texts]
    taken = check(entries, "random numbers")
    assert sum(taken) > 8_000, sum(taken)


def test_random_timestamps_agree() -> None:
    rng = random.Random(SEED + 8)
    stamps = [rng.randint(MIN_EPOCH_MS, LATEST_MS) for _ in range(5_000)] + [rng.randint(0, 999) for _ in range(20)]
    texts: list[Any] = []
    for ms in stamps:
        iso = datetime.fromtimestamp(ms // 1000, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.") + f"{ms % 1000:03d}Z"
        texts += [ms, iso, ms - ms % 1000]
    assert sum(check([entry(payload(timestamp=t)) for t in texts], "random timestamps")) == len(texts) - 60


def test_random_sentinels_agree() -> None:
    rng = random.Random(SEED + 9)
    values: list[Any] = []
    for _ in range(5_000):
        data = bytes(rng.randrange(256) for _ in range(rng.randint(0, 40)))
        digits = "0" * rng.choice([0, 0, 3]) + "".join(rng.choice(string.digits) for _ in range(rng.randint(1, 30)))
        values += [{"__buffer": base64.b64encode(data).decode()}, {"type": "Buffer", "data": list(data)},
                   {"__bigint": digits}]
    entries = [entry(payload(attributes={"a": v, "b": 1})) for v in values]
    assert all(check(entries, "random sentinels"))


@pytest.mark.backends("plain")
def test_its_rows_are_stored_as_the_writers_own(pg_url: str, pg_conn: Any) -> None:
    payloads = list(Fleet(300, seed=21, start_ms=int(NOW * 1000) - 3_600_000).payloads(1500))
    results, rows = Decoder().decode_rows([entry(p) for p in payloads], NOW)
    assert None not in rows
    batches = {
        "compiled": [Record(f"{i}-0", p, b"", 1, row) for i, (p, row) in enumerate(zip(results, rows))],
        "python": [Record(f"{i}-0", p) for i, p in enumerate(PYTHON.decode_batch([entry(p) for p in payloads], NOW))],
    }
    stored = {}
    writer = Writer(dsn=pg_url, threads=1)
    try:
        for way, batch in batches.items():
            assert writer.write(batch) == [INSERTED] * len(batch)
            with pg_conn.cursor() as cur:
                cur.execute("SELECT device_id, ts, latitude::text, longitude::text, altitude::text, angle::text, "
                            "speed::text, satellites, priority, event_id, attributes::text "
                            "FROM positions ORDER BY device_id, ts")
                stored[way] = cur.fetchall()
                cur.execute("TRUNCATE positions")
            pg_conn.commit()
    finally:
        writer.close(5)
    assert len(stored["compiled"]) == 1500
    assert stored["compiled"] == stored["python"]


def test_a_failing_compiled_way_leaves_the_batch_to_the_python_ways(caplog: pytest.LogCaptureFixture) -> None:
    decoder = Decoder()

    def fails(*args: Any) -> Any:
        raise MemoryError

    decoder._compiled = fails  # what a C allocation failure would raise
    entries = [entry(payload()), entry(b"{"), entry(payload(latitude=Raw("1e1")))]
    results, rows = decoder.decode_rows(entries, NOW)
    assert [repr(r) for r in results] == [repr(r) for r in PYTHON.decode_batch(entries, NOW)]
    assert rows == [None, None, None]
    assert [r.message for r in caplog.records] == [
        "the compiled decoder failed on a batch; decoding it the Python ways"]
