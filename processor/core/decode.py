"""Stream entry -> Position, or a Rejection saying why it can never be stored (CONTRACT 1, 1.1, 1.2).

This is the hot path: every entry goes through :meth:`Decoder.decode` (or, a batch at a
time, :meth:`Decoder.decode_batch`) once. It never raises, whatever the entry holds: the
result is always a :class:`Position` or a :class:`Rejection` with a reason from
:data:`processor.core.types.REASONS`.

Two ways, one result (issue 13). The **typed way** decodes and checks a payload in one
msgspec call (``_Typed``: the fields, their types and ranges) and accepts only what passes
every rule below; it declines everything else, and every case where msgspec and orjson could
read the same text differently. The **exact way** (orjson, then the checks in the order
below) decides what the typed way declines, and alone names rejections: reasons and details
are its own. tests/test_decode_typed.py checks that both ways agree.

Order of the checks (the first that fails gives the reason):

1. ``fields`` is None, empty, not a mapping, has no ``payload`` field, or the payload is
   empty or None -> ``missing_payload``. Other fields of the entry are ignored.
2. More than 64 fields in the entry, or a payload over ``max_payload_bytes`` (byte
   length) -> ``too_large``; the detail names the limit.
3. Parsing (orjson): invalid JSON, invalid UTF-8, NaN/Infinity, a number that overflows
   to infinity (``1e400``), a lone surrogate, nesting deeper than orjson's own 1024 levels
   -> ``invalid_json``. A payload that is neither bytes nor str -> ``invalid_type``.
   Top-level JSON that is not an object -> ``invalid_type``.
4. U+0000 anywhere, in a string or a key, at any depth -> ``nul_character`` (PostgreSQL
   text and jsonb cannot hold it). The document is walked only when the raw bytes contain
   the escape ``\\u0000``; that test also matches an escaped backslash followed by
   ``u0000`` (a literal backslash, not a NUL), so the walk checks the parsed strings.
5. The fields, in this order: device_id, timestamp, latitude, longitude, altitude, angle,
   speed, satellites, priority, event_id, attributes. A required field that is absent
   *or JSON null* -> ``missing_field``; an optional field that is null counts as absent.
   Unknown top-level keys are ignored.

Field rules:

- ``device_id``: a string (else ``invalid_type``) of 1-64 characters with no control
  character (U+0000-U+001F, U+007F-U+009F) -> else ``invalid_device_id``. Tab (U+0009) and
  newline (U+000A) ARE allowed: the security issue requires a device id holding tab,
  newline, backslash, quote or ``\\N`` to round-trip exactly, and the issue is the later
  word, so it wins over CONTRACT 1 ("no control characters") for these two.
- ``timestamp``: an ISO-8601 string with ``Z`` or an explicit offset, or integer epoch
  milliseconds. Accepted string forms: extended ``YYYY-MM-DDTHH:MM[:SS[.f]]`` (``T`` or a
  space) and basic ``YYYYMMDDTHHMM[SS[.f]]``, ``.`` or ``,`` before 1-9 fraction digits
  (beyond microseconds they are truncated: PostgreSQL keeps microseconds), then ``Z`` or
  ``+HH``, ``+HHMM``, ``+HH:MM`` (offsets below 24 h). A naive or malformed string, week
  and ordinal dates -> ``invalid_timestamp``. A bool, a float or any other type ->
  ``invalid_type``. Epoch milliseconds convert exactly (integer ``timedelta``, no float
  division). Before 2000-01-01T00:00:00Z, more than ``max_future_skew_s`` after ``now``,
  or beyond what ``datetime`` can represent -> ``timestamp_out_of_window``.
  ``Position.ts`` is timezone-aware UTC.
- ``latitude`` / ``longitude``: a JSON number (a bool is not) -> else ``invalid_type``;
  finite and within -90..90 / -180..180 -> else ``out_of_range``. Stored as float.
- ``altitude`` (finite), ``angle`` (0..360), ``speed`` (>= 0): numbers stored as float in
  ``real`` columns, so |v| <= 3.4e38 and a non-zero |v| >= 1e-45 (smaller ones underflow
  to zero and PostgreSQL refuses them) -> else ``out_of_range``.
- ``satellites`` (0..255), ``priority`` (0..2), ``event_id`` (0..2147483647, an
  ``integer`` column): JSON integers. ``5.0`` -> ``invalid_type``. orjson reads an integer
  literal beyond 64 bits as a float, so an integral float of magnitude >= 2**63 is taken
  for such a literal -> ``out_of_range`` (``timestamp_out_of_window`` for the timestamp).
- ``attributes``: an object (else ``invalid_type``) whose values are numbers, strings,
  booleans, null, arrays, objects or sentinels at any depth. Sentinels (CONTRACT 1.1) are
  replaced in place: ``{"__bigint": "<-?digits, at most 100>"}`` -> an int when
  |v| <= 2**53-1, else its normalised decimal string; ``{"__buffer": "<strict base64>"}``
  and ``{"type": "Buffer", "data": [0..255, ...]}`` (exactly those keys) -> a lowercase
  hex string. A malformed sentinel -> ``invalid_sentinel``; an object whose only key
  starts with ``__`` and is not a sentinel -> ``unknown_sentinel``. The attributes object
  itself follows the same rule (it cannot be a sentinel: ``invalid_type``). Containers
  nested deeper than 32 levels (the attributes object is level 1) -> ``too_large``, which
  also keeps orjson's serializer (limit 255 levels) safe in :func:`dumps_attributes`.
  The walk uses an explicit stack: no RecursionError, even at orjson's 1024 levels.

Details are readable, at most 200 characters, and quote at most 60 characters of a value.
"""

from __future__ import annotations

import binascii
import logging
import re
import reprlib
import time
from collections.abc import Mapping, Sequence
from datetime import datetime, timedelta, timezone
from typing import Annotated, Any, Final

import msgspec
import orjson

from .types import (
    INVALID_DEVICE_ID,
    INVALID_JSON,
    INVALID_SENTINEL,
    INVALID_TIMESTAMP,
    INVALID_TYPE,
    MISSING_FIELD,
    MISSING_PAYLOAD,
    NUL_CHARACTER,
    OUT_OF_RANGE,
    TIMESTAMP_OUT_OF_WINDOW,
    TOO_LARGE,
    UNKNOWN_SENTINEL,
    Position,
    Rejection,
)

try:  # built from _speedups.c at install; where no C compiler was found, the Python ways do it all
    from . import _speedups
except ImportError:  # pragma: no cover - depends on the build
    _speedups = None  # type: ignore[assignment]

COMPILED: Final = _speedups is not None  # the compiled way was built (processor_info{decoder})

log = logging.getLogger(__name__)

MAX_FIELDS: Final = 64  # stream entry fields; ours carry one, so 64 is generous
MAX_ATTRIBUTE_DEPTH: Final = 32  # the attributes object is level 1
MAX_DEVICE_ID_CHARS: Final = 64
MAX_BIGINT_DIGITS: Final = 100
MAX_EVENT_ID: Final = 2_147_483_647  # an `integer` column
MAX_SAFE_INTEGER: Final = 2**53 - 1  # JavaScript's Number.MAX_SAFE_INTEGER
MAX_DETAIL_CHARS: Final = 200
MAX_QUOTE_CHARS: Final = 60
REAL_MAX: Final = 3.4e38  # PostgreSQL real (float4) limit, rounded down
REAL_MIN: Final = 1e-45  # non-zero magnitudes below this underflow to 0 and PostgreSQL refuses them
MIN_TS: Final = datetime(2000, 1, 1, tzinfo=timezone.utc)
EPOCH: Final = datetime(1970, 1, 1, tzinfo=timezone.utc)
MIN_EPOCH_MS: Final = 946_684_800_000  # MIN_TS in epoch milliseconds

_PAYLOAD: Final = b"payload"
_NUL_ESCAPE: Final = b"\\u0000"
_INT64_LITERAL: Final = 2.0**63  # orjson turns integer literals beyond 64 bits into floats
_UTC: Final = timezone.utc
_MAX_TS: Final = datetime.max.replace(tzinfo=_UTC)

# Control characters refused in device_id: C0 and C1, except tab and newline (see module doc).
_DEVICE_ID_CONTROL: Final = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f]")
_BIGINT: Final = re.compile(r"-?[0-9]{1,%d}" % MAX_BIGINT_DIGITS)
_OFFSET: Final = r"(?:Z|[+-](?:[01][0-9]|2[0-3])(?::?[0-5][0-9])?)"
_FRACTION: Final = r"(?:[.,][0-9]{1,9})?"
_ISO_TIMESTAMP: Final = re.compile(
    r"(?:[0-9]{4}-[0-9]{2}-[0-9]{2}[T ][0-9]{2}:[0-9]{2}(?::[0-9]{2}" + _FRACTION + r")?"
    r"|[0-9]{8}T[0-9]{4}(?:[0-9]{2}" + _FRACTION + r")?)" + _OFFSET
)
_MAX_ISO_CHARS: Final = 40


_quoter = reprlib.Repr()
_quoter.maxstring = MAX_QUOTE_CHARS
_quoter.maxother = MAX_QUOTE_CHARS
_quoter.maxlong = MAX_QUOTE_CHARS
_quoter.maxlevel = 2


class _Invalid(Exception):
    """Raised inside the decoder by the first failed check; decode() turns it into a Rejection."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(reason, detail)
        self.reason = reason
        self.detail = detail


def _quote(value: Any) -> str:
    """A short, safe repr: bounded in size and depth whatever ``value`` holds."""
    text = _quoter.repr(value)
    return text if len(text) <= MAX_QUOTE_CHARS else text[: MAX_QUOTE_CHARS - 3] + "..."


def _json_type(value: Any) -> str:
    """The JSON name of a parsed value's type, for details."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def _wrong_type(field: str, expected: str, value: Any) -> _Invalid:
    return _Invalid(INVALID_TYPE, f"{field}: expected {expected}, got {_json_type(value)} {_quote(value)}")


def _out_of_range(field: str, rule: str, value: Any) -> _Invalid:
    return _Invalid(OUT_OF_RANGE, f"{field}: {_quote(value)} is out of range ({rule})")


class Decoder:
    """Decodes stream entries (CONTRACT 1). One instance may be shared by threads: it keeps
    only a cache of the window limit for the last ``now``, replaced atomically."""

    def __init__(self, *, max_payload_bytes: int = 65536, max_future_skew_s: int = 86400,
                 compiled: bool = True) -> None:
        if max_payload_bytes <= 0:
            raise ValueError("max_payload_bytes must be positive")
        if max_future_skew_s < 0:
            raise ValueError("max_future_skew_s must not be negative")
        self._max_payload_bytes = max_payload_bytes
        self._max_future_skew_s = max_future_skew_s
        self._limit: tuple[float, datetime] = (float("nan"), MIN_TS)
        self._limit_ms: tuple[datetime | None, int] = (None, 0)  # the limit in epoch ms
        # The compiled way, where it was built (and not turned off: the tests compare the ways).
        self._compiled = _speedups.decode_batch if compiled and _speedups is not None else None

    @property
    def compiled(self) -> bool:
        """True when the compiled way (processor/core/_speedups.c) takes the usual entries."""
        return self._compiled is not None

    def decode(self, fields: Mapping[bytes, bytes], now: float | None = None) -> Position | Rejection:
        """One entry's fields -> a Position, or a Rejection. Never raises."""
        return self.decode_batch((fields,), time.time() if now is None else now)[0]

    def decode_batch(self, entries: Sequence[Mapping[bytes, bytes]], now: float) -> list[Position | Rejection]:
        """``[decode(fields, now) for fields in entries]``, the same results in order, with the
        per-batch work (the time window) done once and no Python call per entry. Never raises."""
        return self.decode_rows(entries, now)[0]

    def decode_rows(self, entries: Sequence[Mapping[bytes, bytes]], now: float
                    ) -> tuple[list[Position | Rejection], list[bytes | None]]:
        """:meth:`decode_batch`'s results, and for each Position the compiled way made its row of
        ``positions`` in COPY text, exactly as the writer formats it (None wherever it did not:
        the writer formats that one). Never raises."""
        window = self._window(now)
        if self._compiled is None:
            return self._python_ways(entries, window, now), [None] * len(entries)
        rows: list[Any]
        try:
            results, rows = self._compiled(entries, self._max_payload_bytes, window[1], Position)
        except Exception:  # noqa: BLE001 - never expected (memory): the Python ways take the batch
            log.exception("the compiled decoder failed on a batch; decoding it the Python ways")
            return self._python_ways(entries, window, now), [None] * len(entries)
        if None in results:
            self._decide(entries, results, window, now)
        return results, rows

    def _python_ways(self, entries: Sequence[Any], window: tuple[datetime, int], now: float
                     ) -> list[Position | Rejection]:
        """The typed way, then the exact way for what it declines."""
        results: list[Any] = self._typed_batch(entries, window)
        if None in results:
            for i, result in enumerate(results):
                if result is None:
                    results[i] = self._exact(entries[i], now)
        return results

    def _decide(self, entries: Sequence[Any], results: list[Any], window: tuple[datetime, int], now: float) -> None:
        """Whatever the compiled way declined (None in ``results``): the Python ways."""
        declined = [i for i, result in enumerate(results) if result is None]
        for i, result in zip(declined, self._python_ways([entries[i] for i in declined], window, now)):
            results[i] = result

    def _exact(self, fields: Any, now: float) -> Position | Rejection:
        """Every check in the documented order, with orjson: the reference the typed way must agree
        with, and the way that names the reason of a rejection."""
        try:
            payload = fields.get(_PAYLOAD) if type(fields) is dict and len(fields) <= MAX_FIELDS else None
            if type(payload) is bytes and 0 < len(payload) <= self._max_payload_bytes:
                raw = payload
            else:
                raw = self._payload(fields)
            doc = _parse(raw)
            if _NUL_ESCAPE in raw:
                _check_nul(doc)
            return self._position(doc, now)
        except _Invalid as exc:
            return Rejection(exc.reason, exc.detail[:MAX_DETAIL_CHARS])
        except Exception as exc:  # noqa: BLE001 - a decoder bug must not stall the stream
            # Never expected: the fuzz test asserts this path is not taken. Dead-lettering
            # keeps the entry (it can be redriven after a fix) instead of looping on it.
            log.exception("decoder failed on an entry (a bug): %s", type(exc).__name__)
            return Rejection(INVALID_JSON, f"decoder error: {type(exc).__name__}: {exc}"[:MAX_DETAIL_CHARS])

    # -- the typed way ---------------------------------------------------------------

    def _typed(self, raw: bytes, now: float) -> Position | None:
        """The typed way for one payload (None: it declined)."""
        return self._typed_batch(({_PAYLOAD: raw},), self._window(now))[0]

    def _window(self, now: float) -> tuple[datetime, int]:
        """The latest allowed timestamp for ``now``, as a datetime and as epoch milliseconds."""
        cached_now, limit = self._limit
        if cached_now != now:
            limit = self._latest_allowed(now)
        window = self._limit_ms
        if window[0] is not limit:  # floor division: ms <= it exactly when the ms timestamp <= limit
            window = self._limit_ms = (limit, (limit - EPOCH) // _ONE_MS)
        return window  # type: ignore[return-value]

    def _typed_batch(self, entries: Sequence[Any], window: tuple[datetime, int]) -> list[Position | None]:
        """The Position of each entry that passes every check, its payload decoded and type-checked by
        msgspec in one C call (``_Typed``); None wherever anything is unusual: then :meth:`_exact` decides.

        It must never accept what the exact way rejects nor give another Position. Whatever
        msgspec refuses goes the exact way, and so does every case where msgspec and orjson could
        read the text differently or where only the exact way's checks see: an unknown top-level
        key (the exact way checks its JSON too), a ``\\u0000`` escape, a device id that is not
        alphanumeric, a real below 1e-45, an integer beyond 64 bits or nesting beyond 32 levels
        in attributes, a malformed sentinel. tests/test_decode_typed.py compares both ways on the
        fuzz corpus and where the parsers differ. One loop for the batch, everything inlined:
        a call per entry would cost more than the checks.
        """
        latest, latest_ms = window
        most = self._max_payload_bytes
        typed_decode, seconds_cache, millis_table, from_iso = _TYPED_DECODE, _SECONDS, _MILLIS, _FROM_ISO
        positions: list[Position | None] = []
        append = positions.append
        for fields in entries:
            # The usual entry: a dict, at most MAX_FIELDS fields, a bytes payload within the limit.
            raw = fields.get(_PAYLOAD) if type(fields) is dict and len(fields) <= MAX_FIELDS else None
            if type(raw) is not bytes or not 0 < len(raw) <= most:
                append(None)
                continue
            # a memchr first (tcp-ingestion's JSON.stringify escapes only controls), the 6-byte search if need be
            if raw.find(b"\\") >= 0 and _NUL_ESCAPE in raw:
                append(None)
                continue
            try:
                doc = typed_decode(raw)
            except Exception:  # noqa: BLE001 - msgspec's errors, RecursionError: the exact way names them
                append(None)
                continue
            device_id = doc.device_id
            ts: Any = doc.timestamp
            # msgspec checked device_id's type and length: alphanumeric also means no control character
            if not device_id.isalnum():
                append(None)
                continue
            if type(ts) is int:
                if not MIN_EPOCH_MS <= ts <= latest_ms:
                    append(None)
                    continue
                seconds, millis = divmod(ts, 1000)
                base = seconds_cache.get(seconds)
                if base is None:
                    base = _cache_second(seconds)
                ts = base + millis_table[millis]
            else:
                # tcp-ingestion's ISO form, YYYY-MM-DDTHH:MM:SS.mmmZ: its separators in one slice,
                # its digits read (and checked) by fromisoformat in C, which gives UTC for the Z.
                # Any other form takes the exact parser (its pattern, then fromisoformat).
                try:
                    if len(ts) == 24 and ts[4:20:3] == "--T::." and ts[23] == "Z":
                        ts = from_iso(ts)
                    else:
                        ts = _iso_timestamp(ts)
                except (ValueError, _Invalid):
                    append(None)
                    continue
                if ts < MIN_TS or ts > latest:
                    append(None)
                    continue
            altitude, angle, speed, attributes = doc.altitude, doc.angle, doc.speed, doc.attributes
            # real columns: msgspec checked the range; a non-zero magnitude below 1e-45 would underflow
            if (altitude and -REAL_MIN < altitude < REAL_MIN) or (angle and angle < REAL_MIN) or \
                    (speed and speed < REAL_MIN):
                append(None)
                continue
            # Sentinels replaced, nesting bounded. (A test of the text for where a sentinel could be
            # would always pass: every payload the typed way reads has "device_id", and so a "_".)
            if attributes and not _typed_attributes(attributes):
                append(None)
                continue
            append(_new_position(Position, (device_id, ts, doc.latitude, doc.longitude, altitude, angle, speed,
                                            doc.satellites, doc.priority, doc.event_id, attributes)))
        return positions

    # -- the entry ------------------------------------------------------------------

    def _payload(self, fields: Any) -> bytes:
        """The payload's bytes, after the field-count and size limits."""
        if not fields or not isinstance(fields, Mapping):
            raise _Invalid(MISSING_PAYLOAD, "entry has no fields")
        payload = fields.get(_PAYLOAD)
        if payload is None:
            payload = fields.get("payload")  # a client built with decode_responses=True
        if payload is None:
            raise _Invalid(MISSING_PAYLOAD, "entry has no payload field")
        if len(fields) > MAX_FIELDS:
            raise _Invalid(TOO_LARGE, f"entry has {len(fields)} fields, more than the limit of {MAX_FIELDS}")
        raw = _as_bytes(payload, self._max_payload_bytes)
        if not raw:
            raise _Invalid(MISSING_PAYLOAD, "payload field is empty")
        if len(raw) > self._max_payload_bytes:
            raise _Invalid(TOO_LARGE, f"payload is {len(raw)} bytes, more than "
                                      f"MAX_PAYLOAD_BYTES={self._max_payload_bytes}")
        return raw

    # -- the Position ---------------------------------------------------------------

    def _position(self, doc: dict[str, Any], now: float) -> Position:
        # The hot path. Each field is first tested inline for its common valid form
        # (an IMEI-like id, a float coordinate, a small int...); anything else goes to
        # the field's own function, which accepts the rarer valid forms or raises the
        # exact rejection. Fields are still checked in the documented order, so the
        # results are the same; the inline tests halve the cost (docs/performance.md).
        get = doc.get
        device_id = get("device_id")
        if type(device_id) is not str or not 0 < len(device_id) <= MAX_DEVICE_ID_CHARS \
                or not device_id.isalnum():  # an alphanumeric string holds no control character
            device_id = _device_id(doc)
        ts = self._timestamp(doc, now)
        latitude = get("latitude")
        if type(latitude) is not float or not -90.0 <= latitude <= 90.0:
            latitude = _coordinate(doc, "latitude", 90.0)
        longitude = get("longitude")
        if type(longitude) is not float or not -180.0 <= longitude <= 180.0:
            longitude = _coordinate(doc, "longitude", 180.0)
        # real columns: an int in range is always valid (no int lies strictly between 0 and REAL_MIN)
        altitude = get("altitude")
        if type(altitude) is int and -REAL_MAX <= altitude <= REAL_MAX:
            altitude = float(altitude)
        elif altitude is not None:
            altitude = _real(doc, "altitude", -REAL_MAX, REAL_MAX, "finite, |v| <= 3.4e38")
        angle = get("angle")
        if type(angle) is int and 0 <= angle <= 360:
            angle = float(angle)
        elif angle is not None:
            angle = _real(doc, "angle", 0.0, 360.0, "0..360")
        speed = get("speed")
        if type(speed) is int and 0 <= speed <= REAL_MAX:
            speed = float(speed)
        elif speed is not None:
            speed = _real(doc, "speed", 0.0, REAL_MAX, ">= 0, <= 3.4e38")
        satellites = get("satellites")
        if type(satellites) is not int or not 0 <= satellites <= 255:
            satellites = _integer(doc, "satellites", 0, 255)
        priority = get("priority")
        if type(priority) is not int or not 0 <= priority <= 2:
            priority = _integer(doc, "priority", 0, 2)
        event_id = get("event_id")
        if type(event_id) is not int or not 0 <= event_id <= MAX_EVENT_ID:
            event_id = _integer(doc, "event_id", 0, MAX_EVENT_ID)
        return _new_position(Position, (device_id, ts, latitude, longitude, altitude, angle, speed,
                                        satellites, priority, event_id, _attributes(doc)))

    def _timestamp(self, doc: dict[str, Any], now: float) -> datetime:
        value: Any = doc.get("timestamp")
        kind = type(value)
        if kind is int:
            ts = _epoch_ms_timestamp(value)
        elif kind is str:
            ts = _iso_timestamp(value)
        elif value is None:
            raise _Invalid(MISSING_FIELD, "timestamp is missing")
        elif kind is float and _is_int64_overflow(value):
            raise _Invalid(TIMESTAMP_OUT_OF_WINDOW, f"timestamp: {_quote(value)} is beyond any representable time")
        else:
            raise _wrong_type("timestamp", "an ISO-8601 string or integer epoch milliseconds", value)
        if ts < MIN_TS:
            raise _Invalid(TIMESTAMP_OUT_OF_WINDOW, f"timestamp {ts.isoformat()} is before 2000-01-01T00:00:00Z")
        cached_now, limit = self._limit
        if cached_now != now:
            limit = self._latest_allowed(now)
        if ts > limit:
            raise _Invalid(TIMESTAMP_OUT_OF_WINDOW, f"timestamp {ts.isoformat()} is more than "
                                                    f"{self._max_future_skew_s} s ahead of now")
        return ts

    def _latest_allowed(self, now: float) -> datetime:
        """now + skew as a datetime; computed once per distinct ``now`` (the caller passes one per batch)."""
        cached_now, limit = self._limit
        if cached_now != now:
            try:
                limit = datetime.fromtimestamp(now + self._max_future_skew_s, _UTC)
            except (OverflowError, ValueError, OSError):  # beyond year 9999: no upper bound left
                limit = _MAX_TS
            self._limit = (now, limit)
        return limit


# -- payload and parsing -------------------------------------------------------------

def _as_bytes(payload: Any, max_bytes: int) -> bytes:
    """The payload as bytes (redis-py gives bytes; str and buffers are tolerated)."""
    if isinstance(payload, bytes):
        return payload
    if isinstance(payload, (bytearray, memoryview)):
        return bytes(payload)
    if isinstance(payload, str):
        if len(payload) > max_bytes:  # UTF-8 never has fewer bytes than characters
            raise _Invalid(TOO_LARGE, f"payload is over MAX_PAYLOAD_BYTES={max_bytes}")
        try:
            return payload.encode("utf-8")
        except UnicodeEncodeError:
            raise _Invalid(INVALID_JSON, "payload is not valid UTF-8 (lone surrogate)") from None
    raise _Invalid(INVALID_TYPE, f"payload field is {type(payload).__name__}, not bytes")


def _parse(raw: bytes) -> dict[str, Any]:
    try:
        doc = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise _Invalid(INVALID_JSON, f"payload is not valid JSON: {exc}") from None
    if type(doc) is not dict:
        raise _Invalid(INVALID_TYPE, f"payload is a JSON {_json_type(doc)}, not an object")
    return doc


def _check_nul(doc: dict[str, Any]) -> None:
    """Reject U+0000 in any key or string, at any depth (explicit stack, no recursion)."""
    for field, value in doc.items():
        if "\x00" in field or _has_nul(value):
            raise _Invalid(NUL_CHARACTER, f"U+0000 in {_quote(field)}: PostgreSQL text cannot hold it")


def _has_nul(value: Any) -> bool:
    stack = [value]
    while stack:
        node = stack.pop()
        if type(node) is str:
            if "\x00" in node:
                return True
        elif type(node) is dict:
            for key, item in node.items():
                if "\x00" in key:
                    return True
                stack.append(item)
        elif type(node) is list:
            stack.extend(node)
    return False


# -- fields --------------------------------------------------------------------------

def _device_id(doc: dict[str, Any]) -> str:
    value: Any = doc.get("device_id")
    if type(value) is not str:
        if value is None:
            raise _Invalid(MISSING_FIELD, "device_id is missing")
        raise _wrong_type("device_id", "a string", value)
    if not 0 < len(value) <= MAX_DEVICE_ID_CHARS:
        raise _Invalid(INVALID_DEVICE_ID, f"device_id has {len(value)} characters, not 1-{MAX_DEVICE_ID_CHARS}")
    if _DEVICE_ID_CONTROL.search(value):
        raise _Invalid(INVALID_DEVICE_ID, f"device_id {_quote(value)} contains a control character")
    return value


def _iso_timestamp(text: str) -> datetime:
    if len(text) > _MAX_ISO_CHARS or not _ISO_TIMESTAMP.fullmatch(text):
        raise _Invalid(INVALID_TIMESTAMP, f"timestamp {_quote(text)} is not ISO-8601 with Z or an offset")
    try:
        ts = datetime.fromisoformat(text)
    except ValueError as exc:
        raise _Invalid(INVALID_TIMESTAMP, f"timestamp {_quote(text)}: {exc}") from None
    if ts.tzinfo is _UTC:
        return ts
    try:
        return ts.astimezone(_UTC)
    except OverflowError:
        raise _Invalid(TIMESTAMP_OUT_OF_WINDOW, f"timestamp {_quote(text)} is beyond 9999-12-31 in UTC") from None


def _epoch_ms_timestamp(ms: int) -> datetime:
    if ms < MIN_EPOCH_MS:
        raise _Invalid(TIMESTAMP_OUT_OF_WINDOW, f"timestamp {ms} ms is before 2000-01-01T00:00:00Z")
    # Exact: integer arithmetic, no float division. The whole second comes from a small
    # cache (positions of a batch share a few seconds) and the milliseconds from a table:
    # 0.23 us instead of 0.6 us for EPOCH + timedelta(milliseconds=ms).
    seconds, millis = divmod(ms, 1000)
    try:
        base = _SECONDS.get(seconds)
        if base is None:
            base = EPOCH + timedelta(0, seconds)
            if len(_SECONDS) >= _SECONDS_CACHED:
                _SECONDS.clear()
            _SECONDS[seconds] = base
        return base + _MILLIS[millis]
    except OverflowError:
        raise _Invalid(TIMESTAMP_OUT_OF_WINDOW, f"timestamp {_quote(ms)} ms is beyond any representable time") from None


def _is_int64_overflow(value: float) -> bool:
    """True for what orjson makes of an integer literal that does not fit 64 bits."""
    return abs(value) >= _INT64_LITERAL and value.is_integer()


def _coordinate(doc: dict[str, Any], field: str, bound: float) -> float:
    value: Any = doc.get(field)
    kind = type(value)
    if kind is not float and kind is not int:  # bool is neither
        if value is None:
            raise _Invalid(MISSING_FIELD, f"{field} is missing")
        raise _wrong_type(field, "a number", value)
    if not -bound <= value <= bound:  # an int is compared exactly; NaN fails too
        raise _out_of_range(field, f"{-bound:g}..{bound:g}", value)
    return float(value)


def _real(doc: dict[str, Any], field: str, low: float, high: float, rule: str) -> float | None:
    """An optional number stored in a ``real`` column."""
    value: Any = doc.get(field)
    kind = type(value)
    if kind is not float and kind is not int:
        if value is None:
            return None
        raise _wrong_type(field, "a number", value)
    if not low <= value <= high:
        raise _out_of_range(field, rule, value)
    if value and -REAL_MIN < value < REAL_MIN:
        raise _out_of_range(field, "non-zero values must be at least 1e-45 in magnitude for a real column", value)
    return float(value)


def _integer(doc: dict[str, Any], field: str, low: int, high: int) -> int | None:
    value: Any = doc.get(field)
    if type(value) is not int:
        if value is None:
            return None
        if type(value) is float and _is_int64_overflow(value):
            raise _out_of_range(field, f"{low}..{high}", value)
        raise _wrong_type(field, "an integer", value)
    if not low <= value <= high:
        raise _out_of_range(field, f"{low}..{high}", value)
    return value


# -- attributes and sentinels ---------------------------------------------------------

_PLAIN: Final = object()  # marks "not a sentinel: an ordinary object"
_SECONDS: Final[dict[int, datetime]] = {}  # epoch second -> datetime; shared by threads (dict ops are atomic)
_SECONDS_CACHED: Final = 4096
_MILLIS: Final = tuple(timedelta(milliseconds=i) for i in range(1000))
_new_position: Final = tuple.__new__  # Position(...) without the keyword-handling __new__: 0.26 us, not 0.46


def _attributes(doc: dict[str, Any]) -> dict[str, Any] | None:
    value: Any = doc.get("attributes")
    if type(value) is not dict:
        if value is None:
            return None
        raise _wrong_type("attributes", "an object", value)
    if _sentinel(value, "attributes") is not _PLAIN:
        raise _Invalid(INVALID_TYPE, "attributes: expected an object, got a sentinel")
    _decode_sentinels(value)
    return value


def _decode_sentinels(root: dict[str, Any]) -> None:
    """Replace every sentinel below ``root`` in place; bound the depth. Explicit stack."""
    stack: list[tuple[Any, int]] = [(root, 1)]
    while stack:
        container, depth = stack.pop()
        items = container.items() if type(container) is dict else enumerate(container)
        for key, value in items:
            kind = type(value)
            if kind is not dict and kind is not list:
                continue  # the common case: a number or a string
            if depth >= MAX_ATTRIBUTE_DEPTH:
                raise _Invalid(TOO_LARGE, f"attributes nested deeper than {MAX_ATTRIBUTE_DEPTH} levels")
            if kind is dict:
                decoded = _sentinel(value, key)
                if decoded is not _PLAIN:
                    container[key] = decoded  # same key: allowed while iterating
                    continue
            stack.append((value, depth + 1))


def _sentinel(obj: dict[str, Any], where: Any) -> Any:
    """The decoded value if ``obj`` is a sentinel (CONTRACT 1.1), else :data:`_PLAIN`."""
    size = len(obj)
    if size == 1:
        key = next(iter(obj))
        if key == "__bigint":
            return _bigint(obj[key], where)
        if key == "__buffer":
            return _base64_buffer(obj[key], where)
        if key.startswith("__"):
            raise _Invalid(UNKNOWN_SENTINEL, f"attribute {_quote(where)}: unknown sentinel {_quote(key)}")
    elif size == 2 and "data" in obj and obj.get("type") == "Buffer":
        return _node_buffer(obj["data"], where)
    return _PLAIN


def _bigint(text: Any, where: Any) -> int | str:
    if type(text) is str and 0 < len(text) <= MAX_BIGINT_DIGITS and text.isascii() and text.isdigit():
        value = int(text)  # the common case, non-negative: ASCII digits are exactly [0-9]
        return value if value <= MAX_SAFE_INTEGER else str(value)
    if type(text) is not str or not _BIGINT.fullmatch(text):
        raise _Invalid(INVALID_SENTINEL, f"attribute {_quote(where)}: __bigint {_quote(text)} is not "
                                         f"a decimal string of at most {MAX_BIGINT_DIGITS} digits")
    value = int(text)
    return value if -MAX_SAFE_INTEGER <= value <= MAX_SAFE_INTEGER else str(value)


def _base64_buffer(text: Any, where: Any) -> str:
    if type(text) is not str:
        raise _Invalid(INVALID_SENTINEL, f"attribute {_quote(where)}: __buffer is a {_json_type(text)}, not a string")
    try:
        return binascii.a2b_base64(text, strict_mode=True).hex()
    except (binascii.Error, ValueError) as exc:
        raise _Invalid(INVALID_SENTINEL, f"attribute {_quote(where)}: __buffer is not strict base64 ({exc})") from None


def _node_buffer(data: Any, where: Any) -> str:
    if type(data) is not list or not all(type(byte) is int and 0 <= byte <= 255 for byte in data):
        raise _Invalid(INVALID_SENTINEL, f"attribute {_quote(where)}: Buffer data is not an array of integers 0-255")
    return bytes(data).hex()


def dumps_attributes(attributes: dict[str, Any] | None) -> str:
    """Compact JSON text of decoded attributes, for a jsonb column; ``'{}'`` for None or empty."""
    if not attributes:
        return "{}"
    return orjson.dumps(attributes).decode("utf-8")


# -- the typed way: msgspec ----------------------------------------------------------

_Real = Annotated[float, msgspec.Meta(ge=-REAL_MAX, le=REAL_MAX)]
_Int64 = Annotated[int, msgspec.Meta(ge=-(2**63), le=2**63 - 1)]


class _Sentinel(msgspec.Struct, forbid_unknown_fields=True, gc=False):
    """An object one level down in attributes, as msgspec decodes it: the keys of CONTRACT 1.1's
    sentinels and nothing else, each with its type (a Node Buffer's bytes 0..255)."""

    bigint: Annotated[str, msgspec.Meta(max_length=MAX_BIGINT_DIGITS)] | msgspec.UnsetType = \
        msgspec.field(name="__bigint", default=msgspec.UNSET)
    buffer: str | msgspec.UnsetType = msgspec.field(name="__buffer", default=msgspec.UNSET)
    type: str | msgspec.UnsetType = msgspec.UNSET
    data: list[Annotated[int, msgspec.Meta(ge=0, le=255)]] | msgspec.UnsetType = msgspec.UNSET


class _Typed(msgspec.Struct, forbid_unknown_fields=True, gc=False):
    """CONTRACT 1's fields with their types and ranges, for msgspec's decoder (C). An unknown key
    is refused (the exact way ignores it, after checking its JSON the orjson way). Not kept: its
    values go into a Position. gc=False: it holds no cycle and lives for one entry."""

    device_id: Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_DEVICE_ID_CHARS)]
    timestamp: int | str
    latitude: Annotated[float, msgspec.Meta(ge=-90.0, le=90.0)]
    longitude: Annotated[float, msgspec.Meta(ge=-180.0, le=180.0)]
    altitude: _Real | None = None
    angle: Annotated[float, msgspec.Meta(ge=0.0, le=360.0)] | None = None
    speed: Annotated[float, msgspec.Meta(ge=0.0, le=REAL_MAX)] | None = None
    satellites: Annotated[int, msgspec.Meta(ge=0, le=255)] | None = None
    priority: Annotated[int, msgspec.Meta(ge=0, le=2)] | None = None
    event_id: Annotated[int, msgspec.Meta(ge=0, le=MAX_EVENT_ID)] | None = None
    # Values one level down typed: msgspec holds integers to 64 bits there (it reads wider literals
    # as ints, orjson as floats; int64 only: msgspec cannot bound an int at 2**64 - 1), and an
    # object there is a sentinel or an empty object (any other key: the exact way).
    attributes: dict[str, _Int64 | float | str | bool | None | list[Any] | _Sentinel] | None = None


_TYPED_DECODE: Final = msgspec.json.Decoder(_Typed).decode
_UNSET: Final = msgspec.UNSET
_ONE_MS: Final = timedelta(milliseconds=1)
_SAFE_DIGITS: Final = len(str(MAX_SAFE_INTEGER))  # 16: more digits, no leading zero, is above it
_INT64_MIN: Final = -(2**63)
_UINT64_MAX: Final = 2**64 - 1  # orjson reads integer literals outside [-2**63, 2**64-1] as floats; msgspec does not


_FROM_ISO: Final = datetime.fromisoformat  # in C; gives timezone.utc itself for a trailing Z


def _cache_second(seconds: int) -> datetime:
    base = EPOCH + timedelta(0, seconds)
    if len(_SECONDS) >= _SECONDS_CACHED:
        _SECONDS.clear()
    _SECONDS[seconds] = base
    return base


def _typed_attributes(root: dict[str, Any]) -> bool:
    """Sentinels replaced in place, as :func:`_attributes` does; False (then the exact way decides)
    for anything it could judge otherwise: a malformed or unknown sentinel, nesting beyond 32
    levels, a nested integer beyond 64 bits (orjson reads it as a float), the object itself a
    sentinel.

    An object one level down was decoded by msgspec as a :class:`_Sentinel` (it refuses any
    other key: such a payload goes the exact way), its types checked in C, a Node Buffer's
    bytes included: here each is only turned into its value. Arrays take the general walk."""
    if len(root) <= 2 and _is_sentinel_shaped(root):
        return False
    nested = False
    for key, value in root.items():
        kind = type(value)
        if kind is _Sentinel:
            text, buffer, node_type, data = value.bigint, value.buffer, value.type, value.data
            if text is not _UNSET:
                if buffer is not _UNSET or node_type is not _UNSET or data is not _UNSET:
                    return False
                size = len(text)
                if not (size and text.isascii() and text.isdigit()):
                    return False  # a sign, or no digits: the exact way's pattern decides
                if size > _SAFE_DIGITS and text[0] != "0":
                    root[key] = text  # above 2**53 - 1, and already its own normalised decimal string
                else:
                    number = int(text)
                    root[key] = number if number <= MAX_SAFE_INTEGER else str(number)
            elif buffer is not _UNSET:
                if node_type is not _UNSET or data is not _UNSET:
                    return False
                try:
                    root[key] = binascii.a2b_base64(buffer, strict_mode=True).hex()
                except (binascii.Error, ValueError):
                    return False
            elif node_type == "Buffer" and data is not _UNSET:
                root[key] = bytes(data).hex()  # msgspec checked every byte is an int 0..255
            elif node_type is _UNSET and data is _UNSET:
                root[key] = {}  # an empty object: plain, kept
            else:
                return False  # {"type": ...} or {"data": ...} alone, another type: plain objects, the exact way
        elif kind is list:
            nested = True
    return _typed_walk(root) if nested else True


def _is_sentinel_shaped(obj: dict[str, Any]) -> bool:
    """What :func:`_sentinel` would not call plain (a sentinel, valid or not)."""
    try:
        return _sentinel(obj, "attributes") is not _PLAIN
    except _Invalid:
        return True


def _typed_walk(root: dict[str, Any]) -> bool:
    """The general walk of :func:`_decode_sentinels`, for the typed way (False instead of raising)."""
    stack: list[tuple[Any, int]] = [(root, 1)]
    while stack:
        container, depth = stack.pop()
        items = container.items() if type(container) is dict else enumerate(container)
        for key, value in items:
            kind = type(value)
            if kind is int:
                if not _INT64_MIN <= value <= _UINT64_MAX:
                    return False
                continue
            if kind is not dict and kind is not list:
                continue
            if depth >= MAX_ATTRIBUTE_DEPTH:
                return False
            if kind is dict:
                try:
                    decoded = _sentinel(value, key)
                except _Invalid:
                    return False
                if decoded is not _PLAIN:
                    container[key] = decoded
                    continue
            stack.append((value, depth + 1))
    return True
