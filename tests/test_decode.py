"""The Position decoder (CONTRACT 1, 1.1, 1.2): pure unit tests, no servers."""

from __future__ import annotations

import base64
import time
from datetime import datetime, timedelta, timezone
from typing import Any

import orjson
import pytest

from processor.core import types
from processor.core.decode import Decoder, dumps_attributes
from processor.core.types import Position, Rejection

UTC = timezone.utc
NOW = 1_714_564_800.0  # 2024-05-01T12:00:00Z
NOW_DT = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
SKEW = 86400

VALID: dict[str, Any] = {
    "device_id": "356307042441013",
    "timestamp": "2024-05-01T10:15:30.250Z",
    "latitude": 54.6872,
    "longitude": 25.2797,
}

FULL = (
    b'{"device_id":"356307042441013","timestamp":"2024-05-01T12:15:30.123456+02:00",'
    b'"latitude":54.6872,"longitude":-25.2797,"altitude":112,"angle":270.5,"speed":42.5,'
    b'"satellites":11,"priority":2,"event_id":240,"unknown_top_level":[1,2],'
    b'"attributes":{"21":5,"66":12950,"200":"text","16":true,"17":null,"18":-1.5,'
    b'"78":{"__bigint":"18446744073709551615"},"79":{"__bigint":"-42"},'
    b'"257":{"__buffer":"AQID/w=="},"258":{"type":"Buffer","data":[0,16,255]},'
    b'"list":[1,{"__bigint":"9007199254740992"}],"obj":{"a":{"__buffer":""},"b":2}}}'
)


def entry(payload: Any, **extra: bytes) -> Any:
    """Stream entry fields as redis-py gives them (bytes keys and values)."""
    if isinstance(payload, dict):
        payload = orjson.dumps(payload)
    fields = {b"payload": payload}
    fields.update({key.encode(): value for key, value in extra.items()})
    return fields


def decode(payload: Any, *, now: float = NOW, decoder: Decoder | None = None) -> Position | Rejection:
    return (decoder or Decoder()).decode(entry(payload), now=now)


def with_(**changes: Any) -> dict[str, Any]:
    """VALID with some fields changed; a value of ... removes the field."""
    doc = dict(VALID)
    for key, value in changes.items():
        if value is ...:
            doc.pop(key, None)
        else:
            doc[key] = value
    return doc


def raw_with(field: str, json_text: str) -> bytes:
    """VALID as JSON text with one field written verbatim (for values orjson.dumps cannot write)."""
    doc = {key: value for key, value in VALID.items() if key != field}
    return orjson.dumps(doc)[:-1] + f',"{field}":{json_text}}}'.encode()


def assert_rejected(result: Position | Rejection, reason: str, detail: str | None = None) -> Rejection:
    assert isinstance(result, Rejection), result
    assert result.reason == reason, result
    assert 0 < len(result.detail) <= 200
    if detail is not None:
        assert result.detail == detail
    return result


def accepted(result: Position | Rejection) -> Position:
    assert isinstance(result, Position), result
    return result


def attrs_of(attributes: Any) -> Any:
    return accepted(decode(with_(attributes=attributes))).attributes


def nested(depth: int, leaf: Any = 1) -> dict[str, Any]:
    """An attributes object ``depth`` levels deep (the attributes object itself is level 1)."""
    value: Any = leaf
    for _ in range(depth):
        value = {"k": value}
    return value


# -- a valid payload -------------------------------------------------------------------

def test_full_payload_gives_exact_position() -> None:
    position = accepted(Decoder().decode(entry(FULL, other=b"\xff ignored"), now=NOW))
    assert position == Position(
        device_id="356307042441013",
        ts=datetime(2024, 5, 1, 10, 15, 30, 123456, tzinfo=UTC),
        latitude=54.6872,
        longitude=-25.2797,
        altitude=112.0,
        angle=270.5,
        speed=42.5,
        satellites=11,
        priority=2,
        event_id=240,
        attributes={
            "21": 5, "66": 12950, "200": "text", "16": True, "17": None, "18": -1.5,
            "78": "18446744073709551615", "79": -42,
            "257": "010203ff", "258": "0010ff",
            "list": [1, "9007199254740992"], "obj": {"a": "", "b": 2},
        },
    )
    assert position.ts.utcoffset() == timedelta(0)
    for name in ("altitude", "angle", "speed", "latitude", "longitude"):
        assert type(getattr(position, name)) is float
    assert dumps_attributes(position.attributes) == (
        '{"21":5,"66":12950,"200":"text","16":true,"17":null,"18":-1.5,"78":"18446744073709551615",'
        '"79":-42,"257":"010203ff","258":"0010ff","list":[1,"9007199254740992"],"obj":{"a":"","b":2}}'
    )


def test_minimal_payload_leaves_optionals_unset() -> None:
    position = accepted(decode(VALID))
    assert position == Position("356307042441013", datetime(2024, 5, 1, 10, 15, 30, 250000, tzinfo=UTC),
                                54.6872, 25.2797)


@pytest.mark.parametrize("field", ["altitude", "angle", "speed", "satellites", "priority", "event_id", "attributes"])
def test_null_optional_field_counts_as_absent(field: str) -> None:
    assert getattr(accepted(decode(with_(**{field: None}))), field) is None


def test_integer_coordinates_are_stored_as_float() -> None:
    position = accepted(decode(with_(latitude=-90, longitude=180)))
    assert (position.latitude, position.longitude) == (-90.0, 180.0)
    assert type(position.latitude) is float and type(position.longitude) is float


def test_payload_as_str_is_accepted() -> None:
    # A client built with decode_responses=True gives str keys and values.
    str_fields: Any = {"payload": orjson.dumps(VALID).decode()}
    result = Decoder().decode(str_fields, now=NOW)
    assert accepted(result).device_id == "356307042441013"


def test_now_defaults_to_the_clock() -> None:
    stamp = int(time.time() * 1000)
    assert accepted(Decoder().decode(entry(with_(timestamp=stamp)))).ts == \
        datetime(1970, 1, 1, tzinfo=UTC) + timedelta(milliseconds=stamp)


# -- missing_payload, too_large ----------------------------------------------------------

@pytest.mark.parametrize("fields", [None, {}, [], {b"other": b"x"}, {b"payload": None}, {b"payload": b""}],
                         ids=["none", "empty", "list", "no-payload", "payload-none", "payload-empty"])
def test_missing_payload(fields: Any) -> None:
    assert_rejected(Decoder().decode(fields, now=NOW), types.MISSING_PAYLOAD)


def test_payload_over_the_limit_is_too_large() -> None:
    raw = orjson.dumps(VALID)
    decoder = Decoder(max_payload_bytes=len(raw))
    accepted(decoder.decode(entry(raw), now=NOW))
    bigger = raw[:-1] + b" }"
    assert_rejected(decoder.decode(entry(bigger), now=NOW), types.TOO_LARGE,
                    f"payload is {len(bigger)} bytes, more than MAX_PAYLOAD_BYTES={len(raw)}")


def test_limit_counts_bytes_not_characters() -> None:
    doc = with_(device_id="é" * 20)  # 20 characters, 40 bytes
    raw = orjson.dumps(doc)
    assert_rejected(Decoder(max_payload_bytes=len(raw) - 1).decode(entry(raw), now=NOW), types.TOO_LARGE)
    str_fields: Any = {"payload": raw.decode()}
    assert_rejected(Decoder(max_payload_bytes=len(raw) - 1).decode(str_fields, now=NOW),
                    types.TOO_LARGE)


def test_ten_megabyte_payload_is_too_large_quickly() -> None:
    raw = b'{"device_id":"' + b"x" * (10 * 1024 * 1024) + b'"}'
    started = time.perf_counter()
    result = Decoder().decode(entry(raw), now=NOW)
    elapsed = time.perf_counter() - started
    assert_rejected(result, types.TOO_LARGE, f"payload is {len(raw)} bytes, more than MAX_PAYLOAD_BYTES=65536")
    assert elapsed < 0.5  # generous: only the length is looked at


@pytest.mark.parametrize("count,reason", [(64, None), (65, types.TOO_LARGE), (10_000, types.TOO_LARGE)])
def test_field_count_limit(count: int, reason: str | None) -> None:
    fields = entry(VALID)
    fields.update({f"f{i}".encode(): b"v" for i in range(count - 1)})
    assert len(fields) == count
    result = Decoder().decode(fields, now=NOW)
    if reason is None:
        accepted(result)
    else:
        assert_rejected(result, reason, f"entry has {count} fields, more than the limit of 64")


# -- invalid_json, invalid_type (document) ---------------------------------------------------

@pytest.mark.parametrize("raw", [
    b"{", b"not json", b'{"device_id": "x",}', b'{"a":1}x', b"\xef\xbb\xbf{}",
    raw_with("latitude", "NaN"), raw_with("latitude", "Infinity"), raw_with("latitude", "-Infinity"),
    raw_with("latitude", "1e400"), raw_with("altitude", "-1e400"),
    raw_with("attributes", '{"a": NaN}'), raw_with("attributes", '{"a": 1e400}'),
    b'{"device_id": "\xff"}', b'{"device_id": "\xc0\x80"}', b'{"device_id": "\xed\xa0\x80"}', b"\x80",
    raw_with("device_id", '"\\ud800"'), raw_with("attributes", '{"\\udfff": 1}'),
    raw_with("attributes", "[" * 1100 + "]" * 1100),
    b'{"device_id": "a\x00b"}', b'{"device_id": "a\x01b"}',
], ids=lambda raw: repr(raw[:40]))
def test_invalid_json(raw: bytes) -> None:
    result = assert_rejected(decode(raw), types.INVALID_JSON)
    assert result.detail.startswith("payload is not valid JSON: ")


@pytest.mark.parametrize("raw,kind", [(b"[]", "array"), (b'"text"', "string"), (b"42", "number"),
                                      (b"null", "null"), (b"true", "boolean")])
def test_top_level_not_an_object_is_invalid_type(raw: bytes, kind: str) -> None:
    assert_rejected(decode(raw), types.INVALID_TYPE, f"payload is a JSON {kind}, not an object")


@pytest.mark.parametrize("payload", [42, 1.5, ["x"], object()])
def test_payload_of_a_strange_type_is_invalid_type(payload: Any) -> None:
    assert_rejected(Decoder().decode({b"payload": payload}, now=NOW), types.INVALID_TYPE)


def test_payload_with_lone_surrogate_str_is_invalid_json() -> None:
    str_fields: Any = {"payload": '{"device_id": "\ud800"}'}
    assert_rejected(Decoder().decode(str_fields, now=NOW), types.INVALID_JSON)


# -- nul_character -----------------------------------------------------------------------------

@pytest.mark.parametrize("raw,field", [
    (raw_with("device_id", '"35630\\u00007042441013"'), "device_id"),
    (raw_with("timestamp", '"2024-05-01T10:15:30\\u0000Z"'), "timestamp"),
    (raw_with("attributes", '{"1": "a\\u0000"}'), "attributes"),
    (raw_with("attributes", '{"\\u0000": 1}'), "attributes"),
    (raw_with("attributes", '{"k\\u0000ey": 1}'), "attributes"),
    (raw_with("attributes", '{"1": [1, {"2": [["x", "\\u0000"]]}]}'), "attributes"),
    (raw_with("attributes", '{"1": {"__bigint": "1\\u0000"}}'), "attributes"),
    (raw_with("extra", '"\\u0000"'), "extra"),
    (raw_with("extra\\u0000", "1"), "extra\x00"),
], ids=["device_id", "timestamp", "attr-value", "attr-key", "attr-key-middle", "attr-deep-array",
        "inside-sentinel", "ignored-field", "ignored-key"])
def test_nul_character_anywhere(raw: bytes, field: str) -> None:
    assert_rejected(decode(raw), types.NUL_CHARACTER,
                    f"U+0000 in {field!r}: PostgreSQL text cannot hold it")


def test_nul_takes_precedence_over_device_id_rules() -> None:
    assert_rejected(decode(raw_with("device_id", '"\\u0000"')), types.NUL_CHARACTER)


def test_nul_deep_below_the_attribute_depth_limit() -> None:
    deep = "[" * 900 + '"\\u0000"' + "]" * 900
    assert_rejected(decode(raw_with("attributes", '{"a": ' + deep + "}")), types.NUL_CHARACTER)


def test_escaped_backslash_before_u0000_is_not_a_nul() -> None:
    raw = orjson.dumps(with_(device_id="dev\\u0000", attributes={"k\\u0000": "v\\u0000"}))
    assert b"\\\\u0000" in raw
    position = accepted(decode(raw))
    assert position.device_id == "dev\\u0000"
    assert position.attributes == {"k\\u0000": "v\\u0000"}


# -- missing_field, invalid_type (fields) -----------------------------------------------------

@pytest.mark.parametrize("field", ["device_id", "timestamp", "latitude", "longitude"])
@pytest.mark.parametrize("how", ["absent", "null"])
def test_required_field_absent_or_null_is_missing_field(field: str, how: str) -> None:
    doc = with_(**{field: ... if how == "absent" else None})
    assert_rejected(decode(doc), types.MISSING_FIELD, f"{field} is missing")


@pytest.mark.parametrize("field,value", [
    ("device_id", 356307042441013), ("device_id", True), ("device_id", ["a"]), ("device_id", {"a": 1}),
    ("timestamp", True), ("timestamp", False), ("timestamp", 1714558530250.0), ("timestamp", 1.5),
    ("timestamp", [1714558530250]), ("timestamp", {"__bigint": "1714558530250"}),
    ("latitude", True), ("latitude", "54.6"), ("latitude", [54.6]), ("latitude", {"v": 1}),
    ("longitude", False), ("longitude", "25"),
    ("altitude", True), ("altitude", "100"), ("angle", [1]), ("speed", {"__bigint": "1"}),
    ("satellites", 5.0), ("satellites", True), ("satellites", "5"), ("priority", 1.0), ("priority", False),
    ("event_id", 1.5), ("event_id", "240"), ("event_id", {"__bigint": "240"}),
    ("attributes", []), ("attributes", "x"), ("attributes", 1), ("attributes", True),
], ids=lambda v: repr(v)[:30])
def test_wrong_json_type_is_invalid_type(field: str, value: Any) -> None:
    result = assert_rejected(decode(with_(**{field: value})), types.INVALID_TYPE)
    assert result.detail.startswith(f"{field}: expected ")


def test_invalid_type_detail_is_exact() -> None:
    assert_rejected(decode(with_(satellites=5.0)), types.INVALID_TYPE,
                    "satellites: expected an integer, got number 5.0")
    assert_rejected(decode(with_(latitude=True)), types.INVALID_TYPE, "latitude: expected a number, got boolean True")


@pytest.mark.parametrize("attributes", [{"__bigint": "5"}, {"__buffer": "AQ=="}, {"type": "Buffer", "data": [1]}])
def test_attributes_that_are_a_sentinel_are_invalid_type(attributes: dict[str, Any]) -> None:
    assert_rejected(decode(with_(attributes=attributes)), types.INVALID_TYPE,
                    "attributes: expected an object, got a sentinel")


# -- out_of_range --------------------------------------------------------------------------------

@pytest.mark.parametrize("field,value", [
    ("latitude", 90.000001), ("latitude", -90.5), ("latitude", 91), ("latitude", 1e308),
    ("latitude", 18446744073709551615), ("longitude", 180.0001), ("longitude", -181),
    ("altitude", 3.5e38), ("altitude", -1e39), ("altitude", 1e-50), ("altitude", -1e-46),
    ("angle", -0.001), ("angle", 360.01), ("angle", 361), ("angle", 1e-50),
    ("speed", -0.1), ("speed", -1), ("speed", 1e300),
    ("satellites", -1), ("satellites", 256), ("priority", 3), ("priority", -1),
    ("event_id", -1), ("event_id", 2147483648), ("event_id", 18446744073709551615),
], ids=lambda v: repr(v)[:30])
def test_out_of_range(field: str, value: Any) -> None:
    result = assert_rejected(decode(with_(**{field: value})), types.OUT_OF_RANGE)
    assert result.detail.startswith(f"{field}: ")


@pytest.mark.parametrize("field", ["satellites", "event_id", "priority"])
def test_integer_beyond_64_bits_is_out_of_range(field: str) -> None:
    # orjson reads this literal as a float; it is still an integer that cannot fit.
    assert_rejected(decode(raw_with(field, "123456789012345678901234567890")), types.OUT_OF_RANGE)


def test_out_of_range_detail_is_exact() -> None:
    assert_rejected(decode(with_(latitude=90.5)), types.OUT_OF_RANGE, "latitude: 90.5 is out of range (-90..90)")
    assert_rejected(decode(with_(event_id=2147483648)), types.OUT_OF_RANGE,
                    "event_id: 2147483648 is out of range (0..2147483647)")


@pytest.mark.parametrize("field,value", [
    ("latitude", 90), ("latitude", -90.0), ("longitude", 180.0), ("longitude", -180),
    ("altitude", -3.4e38), ("altitude", 3.4e38), ("altitude", 0.0), ("altitude", -12.5), ("altitude", 1e-45),
    ("angle", 0), ("angle", 360), ("speed", 0), ("speed", -0.0), ("speed", 300.5),
    ("satellites", 0), ("satellites", 255), ("priority", 0), ("priority", 2),
    ("event_id", 0), ("event_id", 2147483647),
])
def test_range_edges_are_accepted(field: str, value: Any) -> None:
    assert getattr(accepted(decode(with_(**{field: value}))), field) == value


# -- timestamps ------------------------------------------------------------------------------------

@pytest.mark.parametrize("text,expected", [
    ("2024-05-01T10:15:30Z", datetime(2024, 5, 1, 10, 15, 30, tzinfo=UTC)),
    ("2024-05-01T12:15:30+02:00", datetime(2024, 5, 1, 10, 15, 30, tzinfo=UTC)),
    ("2024-05-01T05:15:30-0500", datetime(2024, 5, 1, 10, 15, 30, tzinfo=UTC)),
    ("2024-05-01T15:15:30+05", datetime(2024, 5, 1, 10, 15, 30, tzinfo=UTC)),
    ("2024-05-01T10:15:30-00:00", datetime(2024, 5, 1, 10, 15, 30, tzinfo=UTC)),
    ("2024-05-01 10:15:30Z", datetime(2024, 5, 1, 10, 15, 30, tzinfo=UTC)),
    ("2024-05-01T10:15Z", datetime(2024, 5, 1, 10, 15, tzinfo=UTC)),
    ("20240501T101530Z", datetime(2024, 5, 1, 10, 15, 30, tzinfo=UTC)),
    ("20240501T101530.5+0100", datetime(2024, 5, 1, 9, 15, 30, 500000, tzinfo=UTC)),
    ("2024-05-01T10:15:30.123456Z", datetime(2024, 5, 1, 10, 15, 30, 123456, tzinfo=UTC)),
    ("2024-05-01T10:15:30.000001+00:00", datetime(2024, 5, 1, 10, 15, 30, 1, tzinfo=UTC)),
    ("2024-05-01T10:15:30,25Z", datetime(2024, 5, 1, 10, 15, 30, 250000, tzinfo=UTC)),
    ("2024-05-01T10:15:30.123456789Z", datetime(2024, 5, 1, 10, 15, 30, 123456, tzinfo=UTC)),
    ("2024-05-01T00:15:30+23:59", datetime(2024, 4, 30, 0, 16, 30, tzinfo=UTC)),
])
def test_iso_timestamps(text: str, expected: datetime) -> None:
    ts = accepted(decode(with_(timestamp=text))).ts
    assert ts == expected
    assert ts.tzinfo is UTC


def test_epoch_ms_and_iso_with_offset_give_the_same_instant() -> None:
    from_ms = accepted(decode(with_(timestamp=1714558530123))).ts
    from_iso = accepted(decode(with_(timestamp="2024-05-01T13:45:30.123+03:30"))).ts
    assert from_ms == from_iso == datetime(2024, 5, 1, 10, 15, 30, 123000, tzinfo=UTC)
    assert from_ms.tzinfo is UTC and from_iso.tzinfo is UTC


@pytest.mark.parametrize("ms", [1714558530001, 2147483647999, 253402300799999, 253402300790001])
def test_epoch_ms_converts_exactly(ms: int) -> None:
    # Near year 9999 float division (ms / 1000) is off by a microsecond; integer arithmetic is not.
    now = 253402300799.0  # 9999-12-31T23:59:59Z: now + skew is past datetime's range
    ts = accepted(decode(with_(timestamp=ms), now=now)).ts
    assert (ts - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(microseconds=1) == ms * 1000


@pytest.mark.parametrize("text", [
    "2024-05-01T10:15:30", "2024-05-01", "2024-05-01T10:15:30z", "2024-05-01t10:15:30Z", "yesterday", "",
    "2024-02-30T10:15:30Z", "2024-05-01T24:00:00Z", "2024-12-31T23:59:60Z", "2024-W18-3T10:15Z",
    "2024-122T10:15:30Z", "2024-05-01T10:15:30+05:99", "2024-05-01T10:15:30+24:00", "2024-05-01T10Z",
    " 2024-05-01T10:15:30Z", "2024-05-01T10:15:30Z ", "2024-05-01T10:15:30 Z", "2024-05-01T10:15:30.Z",
    "2024-05-01T10:15:30.1234567890Z", "２０２４-05-01T10:15:30Z", "2024-05-01T10:15:30+02:00:00",
    "2024-05-01T10:15:30Z" + "0" * 100, "1714558530250",
])
def test_invalid_timestamp(text: str) -> None:
    assert_rejected(decode(with_(timestamp=text)), types.INVALID_TIMESTAMP)


@pytest.mark.parametrize("value", [
    "1999-12-31T23:59:59.999Z", "2000-01-01T00:59:59.999+01:00", 946684799999, 0, -1, -(2**63),
    "0001-01-01T00:00:00+01:00", "9999-12-31T23:59:59-01:00", "9999-12-31T23:59:59Z",
    18446744073709551615, 10**17,
])
def test_timestamp_out_of_window(value: Any) -> None:
    assert_rejected(decode(with_(timestamp=value)), types.TIMESTAMP_OUT_OF_WINDOW)


def test_epoch_ms_beyond_64_bits_is_out_of_window() -> None:
    assert_rejected(decode(raw_with("timestamp", "123456789012345678901234567890")), types.TIMESTAMP_OUT_OF_WINDOW)


@pytest.mark.parametrize("value", ["2000-01-01T00:00:00Z", "2000-01-01T01:00:00+01:00", 946684800000])
def test_window_start_is_inclusive(value: Any) -> None:
    assert accepted(decode(with_(timestamp=value))).ts == datetime(2000, 1, 1, tzinfo=UTC)


def test_window_start_detail() -> None:
    assert_rejected(decode(with_(timestamp="1999-12-31T23:59:59.999Z")), types.TIMESTAMP_OUT_OF_WINDOW,
                    "timestamp 1999-12-31T23:59:59.999000+00:00 is before 2000-01-01T00:00:00Z")


@pytest.mark.parametrize("skew", [86400, 60, 0])
def test_future_skew_window_edge(skew: int) -> None:
    decoder = Decoder(max_future_skew_s=skew)
    edge = NOW_DT + timedelta(seconds=skew)
    edge_ms = int(NOW * 1000) + skew * 1000
    for value in (edge.isoformat(), edge_ms):
        assert accepted(decoder.decode(entry(with_(timestamp=value)), now=NOW)).ts == edge
    for value in ((edge + timedelta(seconds=1)).isoformat(), edge_ms + 1000, edge_ms + 1):
        assert_rejected(decoder.decode(entry(with_(timestamp=value)), now=NOW), types.TIMESTAMP_OUT_OF_WINDOW)


def test_window_follows_the_now_argument() -> None:
    decoder = Decoder()
    doc = with_(timestamp="2024-05-03T12:00:00Z")  # two days after NOW
    assert_rejected(decoder.decode(entry(doc), now=NOW), types.TIMESTAMP_OUT_OF_WINDOW)
    accepted(decoder.decode(entry(doc), now=NOW + 86400))
    assert_rejected(decoder.decode(entry(doc), now=NOW), types.TIMESTAMP_OUT_OF_WINDOW)


# -- device_id ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("device_id", ["", "x" * 65, "é" * 65, "a\x01", "a\x1f", "a\r", "\x0b", "\x0c",
                                       "a\x7f", "a\x80", "a\x85", "a\x9f"], ids=repr)
def test_invalid_device_id(device_id: str) -> None:
    assert_rejected(decode(with_(device_id=device_id)), types.INVALID_DEVICE_ID)


@pytest.mark.parametrize("device_id", ["x", "x" * 64, "é" * 64, "tab\there", "new\nline", "back\\slash",
                                       'quo"te', "\\N", "it's", "a\xa0b", " spaced ", "\U0001f600"], ids=repr)
def test_device_id_round_trips_exactly(device_id: str) -> None:
    assert accepted(decode(with_(device_id=device_id))).device_id == device_id


def test_long_device_id_detail_is_bounded() -> None:
    result = assert_rejected(decode(with_(device_id="\x01" + "y" * 50_000)), types.INVALID_DEVICE_ID,
                             "device_id has 50001 characters, not 1-64")
    result = assert_rejected(decode(with_(device_id="\x01" + "y" * 60)), types.INVALID_DEVICE_ID)
    assert "y" * 70 not in result.detail


# -- sentinels ---------------------------------------------------------------------------------------------

SENTINELS = [
    ({"__bigint": "9007199254740992"}, "9007199254740992"),
    ({"__bigint": "9007199254740991"}, 9007199254740991),
    ({"__bigint": "-9007199254740991"}, -9007199254740991),
    ({"__bigint": "-9007199254740992"}, "-9007199254740992"),
    ({"__bigint": "18446744073709551615"}, "18446744073709551615"),
    ({"__bigint": "0"}, 0),
    ({"__bigint": "-0"}, 0),
    ({"__bigint": "007"}, 7),
    ({"__bigint": "0009007199254740993"}, "9007199254740993"),
    ({"__bigint": "-" + "9" * 100}, "-" + "9" * 100),
    ({"__buffer": "AQID/w=="}, "010203ff"),
    ({"__buffer": "3q2+7w=="}, "deadbeef"),
    ({"__buffer": ""}, ""),
    ({"type": "Buffer", "data": [0, 16, 255]}, "0010ff"),
    ({"type": "Buffer", "data": []}, ""),
]


@pytest.mark.parametrize("sentinel,expected", SENTINELS, ids=lambda v: repr(v)[:40])
def test_sentinel_at_depth_1(sentinel: dict[str, Any], expected: Any) -> None:
    attributes = attrs_of({"1": sentinel, "2": 5})
    assert attributes == {"1": expected, "2": 5}
    assert type(attributes["1"]) is type(expected)


@pytest.mark.parametrize("sentinel,expected", SENTINELS, ids=lambda v: repr(v)[:40])
def test_sentinel_at_depth_3_in_objects_and_arrays(sentinel: dict[str, Any], expected: Any) -> None:
    attributes = attrs_of({
        "objects": {"a": {"b": sentinel}},
        "arrays": [[sentinel, 1], {"c": [sentinel]}],
        "mixed": [{"d": sentinel}],
    })
    assert attributes == {
        "objects": {"a": {"b": expected}},
        "arrays": [[expected, 1], {"c": [expected]}],
        "mixed": [{"d": expected}],
    }


def test_sentinel_bigint_keeps_large_values_as_strings_for_javascript() -> None:
    attributes = attrs_of({str(i): {"__bigint": str(v)} for i, v in enumerate([2**53, 2**53 - 1, -(2**53), 1 - 2**53])})
    assert dumps_attributes(attributes) == \
        '{"0":"9007199254740992","1":9007199254740991,"2":"-9007199254740992","3":-9007199254740991}'


def test_buffer_forms_agree() -> None:
    data = bytes(range(256))
    attributes = attrs_of({"b64": {"__buffer": base64.b64encode(data).decode()},
                           "node": {"type": "Buffer", "data": list(data)}})
    assert attributes["b64"] == attributes["node"] == data.hex()


@pytest.mark.parametrize("obj", [
    {"__bigint": "5", "x": 1}, {"__buffer": "AQ==", "__bigint": "1"}, {"type": "Buffer", "data": [1], "x": 1},
    {"type": "buffer", "data": [1]}, {"type": "Buffer"}, {"data": [1]}, {"type": "Buffer", "value": [1]},
    {"_bigint": "5"}, {"bigint__": "5"}, {}, {"x": {"y": "z"}},
], ids=lambda v: repr(v)[:40])
def test_objects_that_are_not_sentinels_are_kept(obj: dict[str, Any]) -> None:
    assert attrs_of({"1": obj, "2": [obj]}) == {"1": obj, "2": [obj]}


def test_sentinels_inside_plain_multi_key_objects_are_decoded() -> None:
    assert attrs_of({"1": {"__bigint": {"__bigint": "1"}, "x": 2}}) == {"1": {"__bigint": 1, "x": 2}}


@pytest.mark.parametrize("sentinel", [
    {"__bigint": "12a"}, {"__bigint": ""}, {"__bigint": "-"}, {"__bigint": "+5"}, {"__bigint": " 5"},
    {"__bigint": "5 "}, {"__bigint": "1.5"}, {"__bigint": "1e5"}, {"__bigint": "0x10"}, {"__bigint": "1_000"},
    {"__bigint": "\u0663"}, {"__bigint": "9" * 101}, {"__bigint": 5}, {"__bigint": None}, {"__bigint": ["1"]},
    {"__bigint": {"__bigint": "1"}},
    {"__buffer": "QQ"}, {"__buffer": "Q Q=="}, {"__buffer": "QQ===" }, {"__buffer": "QQ==QQ=="}, {"__buffer": "_-=="},
    {"__buffer": "QQ==\n"}, {"__buffer": "é"}, {"__buffer": 5}, {"__buffer": None}, {"__buffer": [1, 2]},
    {"type": "Buffer", "data": [256]}, {"type": "Buffer", "data": [-1]}, {"type": "Buffer", "data": [1.0]},
    {"type": "Buffer", "data": [True]}, {"type": "Buffer", "data": ["1"]}, {"type": "Buffer", "data": [None]},
    {"type": "Buffer", "data": [[1]]}, {"type": "Buffer", "data": "AQ=="}, {"type": "Buffer", "data": None},
    {"type": "Buffer", "data": {"0": 1}}, {"type": "Buffer", "data": [1, 2, 2**64 - 1]},
], ids=lambda v: repr(v)[:40])
@pytest.mark.parametrize("where", ["depth1", "depth3-object", "depth3-array"])
def test_invalid_sentinel(sentinel: dict[str, Any], where: str) -> None:
    attributes = {"depth1": {"1": sentinel},
                  "depth3-object": {"1": {"2": {"3": sentinel}}},
                  "depth3-array": {"1": [0, [sentinel]]}}[where]
    assert_rejected(decode(with_(attributes=attributes)), types.INVALID_SENTINEL)


def test_invalid_sentinel_detail() -> None:
    assert_rejected(decode(with_(attributes={"78": {"__bigint": "12a"}})), types.INVALID_SENTINEL,
                    "attribute '78': __bigint '12a' is not a decimal string of at most 100 digits")


@pytest.mark.parametrize("obj", [{"__date": "2024"}, {"__": 1}, {"__bigint__": "1"}, {"__Buffer": "AQ=="},
                                 {"__map": [[1, 2]]}, {"__set": None}], ids=repr)
@pytest.mark.parametrize("where", ["depth1", "depth3-object", "depth3-array", "root"])
def test_unknown_sentinel(obj: dict[str, Any], where: str) -> None:
    attributes = {"depth1": {"1": obj},
                  "depth3-object": {"1": {"2": {"3": obj}}},
                  "depth3-array": {"1": [[obj]]},
                  "root": obj}[where]
    assert_rejected(decode(with_(attributes=attributes)), types.UNKNOWN_SENTINEL)


def test_unknown_sentinel_detail() -> None:
    assert_rejected(decode(with_(attributes={"9": {"__date": "x"}})), types.UNKNOWN_SENTINEL,
                    "attribute '9': unknown sentinel '__date'")


# -- nesting ---------------------------------------------------------------------------------------------

def test_attributes_32_levels_deep_are_accepted() -> None:
    assert attrs_of(nested(32)) == nested(32)
    assert attrs_of(nested(31, {"__bigint": "5"})) == nested(31, 5)


@pytest.mark.parametrize("attributes", [nested(33), nested(32, {"__bigint": "5"}), nested(32, []),
                                        {"a": [[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[1]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]}],
                         ids=["objects", "sentinel", "empty-array", "arrays"])
def test_attributes_deeper_than_32_levels_are_too_large(attributes: dict[str, Any]) -> None:
    assert_rejected(decode(with_(attributes=attributes)), types.TOO_LARGE,
                    "attributes nested deeper than 32 levels")


def test_attributes_1000_deep_are_too_large_quickly() -> None:
    # 1,000 levels is within orjson's own limit (1024), so the decoder's depth bound answers.
    raw = raw_with("attributes", '{"k":' * 1000 + "1" + "}" * 1000)
    started = time.perf_counter()
    result = decode(raw)
    elapsed = time.perf_counter() - started
    assert_rejected(result, types.TOO_LARGE, "attributes nested deeper than 32 levels")
    assert elapsed < 0.1


@pytest.mark.parametrize("opener,closer", [('{"k":', "}"), ("[", "]")])
def test_nesting_beyond_orjson_limit_is_invalid_json(opener: str, closer: str) -> None:
    raw = raw_with("attributes", '{"k":' + opener * 5000 + "1" + closer * 5000 + "}")
    result = assert_rejected(decode(raw), types.INVALID_JSON)
    assert "depth limit exceeded" in result.detail


def test_deep_nesting_in_an_ignored_field_is_harmless() -> None:
    accepted(decode(raw_with("extra", "[" * 1000 + "]" * 1000)))


# -- dumps_attributes and details -----------------------------------------------------------------------

@pytest.mark.parametrize("attributes,text", [
    (None, "{}"), ({}, "{}"), ({"1": 1}, '{"1":1}'),
    ({"a": "é\t\n\\\"", "b": [True, None, 1.5]}, '{"a":"é\\t\\n\\\\\\"","b":[true,null,1.5]}'),
    ({"big": 18446744073709551615, "neg": -9223372036854775808},
     '{"big":18446744073709551615,"neg":-9223372036854775808}'),
])
def test_dumps_attributes(attributes: dict[str, Any] | None, text: str) -> None:
    assert dumps_attributes(attributes) == text
    assert type(dumps_attributes(attributes)) is str


def test_decoded_attributes_at_max_depth_serialise() -> None:
    attributes = attrs_of(nested(31, {"__buffer": "AQ=="}))
    assert dumps_attributes(attributes) == '{"k":' * 31 + '"01"' + "}" * 31


def test_details_never_hold_the_whole_payload() -> None:
    long_text = "z" * 10_001  # not valid base64 either (length)
    for doc in (with_(latitude=long_text), with_(timestamp=long_text),
                with_(attributes={"1": {"__bigint": long_text}}), with_(attributes={"1": {"__buffer": long_text}}),
                with_(attributes={"1": {"__" + long_text: 1}})):
        result = decode(doc)
        assert isinstance(result, Rejection)
        assert len(result.detail) <= 200
        assert "z" * 61 not in result.detail


def test_decoder_rejects_nonsense_settings() -> None:
    with pytest.raises(ValueError):
        Decoder(max_payload_bytes=0)
    with pytest.raises(ValueError):
        Decoder(max_future_skew_s=-1)


def test_every_rejection_reason_of_the_decoder_is_covered() -> None:
    # The pipeline owns db_rejected and max_deliveries; every other code comes from here.
    samples = {
        types.MISSING_PAYLOAD: {}, types.TOO_LARGE: entry(b"{" + b" " * 70000 + b"}"),
        types.INVALID_JSON: entry(b"{"), types.MISSING_FIELD: entry(with_(latitude=...)),
        types.INVALID_TYPE: entry(with_(latitude="1")), types.OUT_OF_RANGE: entry(with_(latitude=91)),
        types.INVALID_TIMESTAMP: entry(with_(timestamp="x")),
        types.TIMESTAMP_OUT_OF_WINDOW: entry(with_(timestamp=0)),
        types.INVALID_DEVICE_ID: entry(with_(device_id="")),
        types.UNKNOWN_SENTINEL: entry(with_(attributes={"1": {"__x": 1}})),
        types.INVALID_SENTINEL: entry(with_(attributes={"1": {"__bigint": "x"}})),
        types.NUL_CHARACTER: entry(with_(device_id="\x00")),
    }
    assert set(samples) == set(types.REASONS) - {types.DB_REJECTED, types.MAX_DELIVERIES}
    for reason, fields in samples.items():
        assert_rejected(Decoder().decode(fields, now=NOW), reason)
