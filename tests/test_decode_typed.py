"""The decoder's typed way (msgspec) against its exact way (orjson and the documented checks).

:meth:`Decoder.decode` first tries the typed way and falls back to the exact way whenever
the typed way declines. That is only right if the typed way never accepts what the exact
way rejects and never gives another Position: checked here on the fuzz test's 100,000
entries, on realistic payloads, and on the places where msgspec and orjson are known to
read JSON differently. Positions are compared by ``repr``, which tells 1 from 1.0 and True
(``==`` does not). And the typed way must really be taken for the usual payloads: a typed
way that always declined would pass every other test here and buy nothing.
"""

from __future__ import annotations

import random
from typing import Any

import orjson
import pytest

from processor.core import types
from processor.core.decode import Decoder
from processor.core.types import Position, Rejection
from processor.simulate import Fleet
from tests.test_decode_fuzz import NOW, SEED, make_fields

FUZZ_CASES = 100_000
VALID: dict[str, Any] = {"device_id": "356307042441013", "timestamp": 1714558530250, "latitude": 54.6872,
                         "longitude": 25.2797}


def _exact(decoder: Decoder, fields: Any) -> Position | Rejection:
    return decoder._exact(fields, NOW)


def _typed(decoder: Decoder, payload: bytes) -> Position | None:
    return decoder._typed(payload, NOW)


def _same(typed: Position, exact: Position | Rejection, context: str) -> None:
    assert isinstance(exact, Position), f"{context}: typed way accepted what the exact way rejects: {exact}"
    assert repr(typed) == repr(exact), f"{context}:\n typed {typed!r}\n exact {exact!r}"


def _payload(fields: Any) -> bytes | None:
    payload = fields.get(b"payload") if isinstance(fields, dict) else None
    return payload if type(payload) is bytes and 0 < len(payload) <= 65536 else None


def test_typed_way_agrees_with_the_exact_way_on_the_fuzz_corpus() -> None:
    rng = random.Random(SEED)
    decoder = Decoder()
    taken = accepted = 0
    for case in range(FUZZ_CASES):
        fields = make_fields(rng)
        payload = _payload(fields)
        if payload is None or len(fields) > 64:
            continue
        exact = _exact(decoder, fields)
        accepted += isinstance(exact, Position)
        typed = _typed(decoder, payload)
        if typed is not None:
            taken += 1
            _same(typed, exact, f"case {case}: {payload!r:.300}")
        assert repr(decoder.decode(fields, NOW)) == repr(exact), f"case {case}"
    # The corpus's valid documents carry random nested attributes; a good share still goes the typed way.
    assert accepted > FUZZ_CASES // 10
    assert taken > accepted // 2, (taken, accepted)


def test_typed_way_takes_every_realistic_payload_and_agrees() -> None:
    decoder = Decoder()
    payloads = list(Fleet(500, seed=13, start_ms=int(NOW * 1000) - 86_400_000).payloads(5000))
    for payload in payloads:
        typed = _typed(decoder, payload)
        assert typed is not None, payload
        _same(typed, _exact(decoder, {b"payload": payload}), repr(payload))


def test_decode_batch_gives_what_decode_gives() -> None:
    rng = random.Random(SEED + 1)
    decoder = Decoder()
    batch = [make_fields(rng) for _ in range(5000)]
    expected = [repr(decoder.decode(fields, NOW)) for fields in batch]
    assert [repr(r) for r in decoder.decode_batch(batch, NOW)] == expected
    assert decoder.decode_batch([], NOW) == []


def _raw(attributes: str = "", **fields: str) -> bytes:
    """VALID as JSON with ``fields`` written verbatim and ``attributes`` as the attributes object's text."""
    text = orjson.dumps(VALID)[:-1].decode()
    for name, value in fields.items():
        text += f',"{name}":{value}'
    if attributes:
        text += f',"attributes":{attributes}'
    return (text + "}").encode()


# Where msgspec and orjson read the same text differently, or where only the exact way's checks see.
DIVERGENT = [
    _raw('{"a":18446744073709551616}'),  # orjson: float; msgspec: int
    _raw('{"a":-9223372036854775809}'),
    _raw('{"a":[18446744073709551616]}'),
    _raw('{"a":{"b":-9223372036854775809}}'),
    _raw('{"a":9223372036854775808}'),  # within orjson's uint64, beyond msgspec's int64 bound: exact way
    _raw('{"a":' + "1" * 400 + "}"),  # orjson: infinity, invalid_json
    _raw('{"a":1e400}'),
    _raw("{}", extra="1e400"),  # an unknown field: the typed way refuses it, the exact way checks it
    _raw("{}", extra='"\\ud800"'),
    _raw("{}", extra="[" * 1100 + "]" * 1100),
    _raw('{"a":"\\u0000"}'),
    _raw('{"\\u0000":1}'),
    _raw('{"\\u005f\\u005fbigint":"5"}'),  # the attributes object is a sentinel, spelt with escapes
    _raw('{"__bigint":"5"}'),
    _raw('{"k":{"\\u005f_x":1}}'),  # an unknown sentinel, spelt with an escape
    _raw('{"k":{"__bigint":"0009007199254740993"}}'),
    _raw('{"k":{"__bigint":"-9007199254740993"}}'),
    _raw('{"k":{"__bigint":"9007199254740991"}}'),
    _raw('{"k":{"__bigint":"9007199254740992"}}'),
    _raw('{"k":{"__bigint":"\\u0031"}}'),
    _raw('{"k":{"__bigint":"1","__bigint":"12a"}}'),  # duplicate keys: the last one wins, in both
    _raw('{"k":{"__bigint":"12a","__bigint":"1"}}'),
    _raw('{"k":1,"k":{"__bigint":"1"}}'),
    _raw('{"k":{"__bigint":"1"},"k":2}'),
    _raw('{"k":{"type":"Buffer","data":[1,2]}}'),
    _raw('{"k":{"type":"Buffer","data":[256]}}'),
    _raw('{"k":{"__buffer":"QQ"}}'),
    _raw('{"k":{}}'),
    _raw('{"k":[]}'),
    _raw('{"k":' + '{"a":' * 32 + "1" + "}" * 32 + "}"),
    _raw('{"k":' + '{"a":' * 31 + "1" + "}" * 31 + "}"),
    _raw('{"k":-0,"j":-0.0,"i":0.0,"h":1E2,"g":1e-400,"f":5e-324}'),
    _raw("{}", latitude="90", longitude="-180.0"),
    _raw("{}", latitude="90.0000000000000001"),
    _raw("{}", altitude="1e-46"),
    _raw("{}", altitude="-1e-46"),
    _raw("{}", angle="1e-46"),
    _raw("{}", altitude="340000000000000000000000000000000000001"),
    _raw("{}", altitude="3.4e38", speed="3.4e38", angle="360"),
    _raw("{}", satellites="5.0"),
    _raw("{}", satellites="true"),
    _raw("{}", event_id="2147483648"),
    _raw("{}", altitude="null", satellites="null", attributes_="1"),
    orjson.dumps({**VALID, "latitude": 1000, "latitude_": 1}),
    b'{"device_id":"x","timestamp":1714558530250,"latitude":1000,"latitude":1,"longitude":2}',
    b'{"device_id":"x","timestamp":1714558530250,"latitude":1,"latitude":"1","longitude":2}',
    b'{"device_id":"x","timestamp":"2024-05-01T10:15:30z","latitude":1,"longitude":2}',
    b'{"device_id":"x","timestamp":"2024-05-01T10:15:30.1234567891Z","latitude":1,"longitude":2}',
    b'{"device_id":"x","timestamp":"2024-05-01 10:15:30+02","latitude":1,"longitude":2}',
    b'{"device_id":"x","timestamp":946684799999,"latitude":1,"longitude":2}',
    b'{"device_id":"x","timestamp":1714651200000,"latitude":1,"longitude":2}',  # NOW + 86,400 s exactly
    b'{"device_id":"x","timestamp":1714651200001,"latitude":1,"longitude":2}',
    b'{"device_id":"tab\\there","timestamp":1714558530250,"latitude":1,"longitude":2}',
    b'{"device_id":"\xc2\xb2\xc3\xa9","timestamp":1714558530250,"latitude":1,"longitude":2}',
    b' {"device_id":"x","timestamp":1714558530250,"latitude":1,"longitude":2}\n',
    # tcp-ingestion's ISO form, whose second is cached once the exact parser accepted it
    b'{"device_id":"x","timestamp":"2024-05-01T10:15:30.123Z","latitude":1,"longitude":2}',
    b'{"device_id":"x","timestamp":"2024-05-01T10:15:30.999Z","latitude":1,"longitude":2}',
    b'{"device_id":"x","timestamp":"2024-05-01T10:15:30.12aZ","latitude":1,"longitude":2}',
    b'{"device_id":"x","timestamp":"2024-05-01T10:15:30.\xef\xbc\x91\xef\xbc\x92\xef\xbc\x93Z","latitude":1,"longitude":2}',
    b'{"device_id":"x","timestamp":"2024-05-01T10:15:30.123+","latitude":1,"longitude":2}',
    b'{"device_id":"x","timestamp":"2024-02-30T10:15:30.123Z","latitude":1,"longitude":2}',
    b'{"device_id":"x","timestamp":"1999-12-31T23:59:59.999Z","latitude":1,"longitude":2}',
    b'{"device_id":"x","timestamp":1714558530250,"latitude":1,"longitude":2,"attributes":null}',
]


@pytest.mark.parametrize("payload", DIVERGENT, ids=lambda p: repr(p[-60:]))
def test_typed_way_agrees_where_the_parsers_differ(payload: bytes) -> None:
    decoder = Decoder()
    exact = _exact(decoder, {b"payload": payload})
    typed = _typed(decoder, payload)
    if typed is not None:
        _same(typed, exact, repr(payload))
    assert repr(decoder.decode({b"payload": payload}, NOW)) == repr(exact)


def test_numbers_read_alike_by_both_parsers() -> None:
    # Coordinates and attribute values as text of every shape: the typed way must give the same floats.
    rng = random.Random(7)
    decoder = Decoder()
    for _ in range(20_000):
        digits = "".join(rng.choice("0123456789") for _ in range(rng.randint(1, 25)))
        fraction = "".join(rng.choice("0123456789") for _ in range(rng.randint(0, 25)))
        number = f"{rng.choice(['', '-'])}{int(digits[:2])}" + (f".{fraction}" if fraction else "") + \
            (f"e{rng.randint(-330, 310)}" if rng.random() < 0.3 else "")
        payload = _raw(f'{{"n":{number},"m":[{number}]}}', altitude=number)
        exact = _exact(decoder, {b"payload": payload})
        typed = _typed(decoder, payload)
        if typed is not None:
            _same(typed, exact, number)


def test_rejections_are_the_exact_ways() -> None:
    decoder = Decoder()
    result = decoder.decode({b"payload": _raw('{"k":{"__bigint":"12a"}}')}, NOW)
    assert isinstance(result, Rejection) and result.reason == types.INVALID_SENTINEL
    result = decoder.decode({b"payload": _raw("{}", latitude="91")}, NOW)
    assert result == Rejection(types.OUT_OF_RANGE, "latitude: 91 is out of range (-90..90)")


def test_timestamps_of_tcp_ingestions_shape_read_alike() -> None:
    # The typed way reads YYYY-MM-DDTHH:MM:SS.mmmZ with fromisoformat once its separators are
    # in place: every character of that shape replaced by what could slip through (another
    # digit, a non-ASCII digit, a letter, a sign, a space, a separator) must give what the
    # exact way gives, a Position or a rejection.
    base = "2024-05-01T10:15:30.123Z"
    swaps = ["0", "9", "\u0663", "\uff11", "a", "W", "T", "Z", "+", "-", " ", ":", ".", ",", "\u00e9"]
    decoder = Decoder()
    taken = 0
    for i in range(len(base)):
        for swap in swaps:
            text = base[:i] + swap + base[i + 1:]
            for stamp in (text, text[:i] + text[i + 1:], text[:i] + swap + text[i:]):
                payload = orjson.dumps({**VALID, "timestamp": stamp})
                exact = _exact(decoder, {b"payload": payload})
                typed = _typed(decoder, payload)
                if typed is not None:
                    taken += 1
                    _same(typed, exact, repr(stamp))
                assert repr(decoder.decode({b"payload": payload}, NOW)) == repr(exact), repr(stamp)
    assert taken >= 60  # the typed way really reads this shape (80 of the 1,080 texts here)
