"""The WebSocket messages of CONTRACT 9: parsing what a client sends, encoding what it receives.

Shapes follow Directus's realtime messages. Every outgoing message is JSON text, built as bytes:
a subscription frame is a prefix, the positions' already-encoded JSON joined by commas, and a suffix.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable, Union

import orjson

INVALID_PAYLOAD = "INVALID_PAYLOAD"
INVALID_CREDENTIALS = "INVALID_CREDENTIALS"
TOKEN_EXPIRED = "TOKEN_EXPIRED"

MAX_UID_CHARS = 200
MAX_DEVICES_PER_SUBSCRIPTION = 10_000
MAX_SUBSCRIPTIONS_PER_CLIENT = 100

AUTH_OK = b'{"type":"auth","status":"ok"}'
PONG = b'{"type":"pong"}'


class ProtocolError(ValueError):
    """A message the gateway cannot act on: answered with INVALID_PAYLOAD, the connection stays."""


@dataclass(frozen=True, slots=True)
class Auth:
    access_token: str


@dataclass(frozen=True, slots=True)
class Subscribe:
    uid: str
    devices: frozenset[str] | None = None
    bbox: tuple[float, float, float, float] | None = None


@dataclass(frozen=True, slots=True)
class Unsubscribe:
    uid: str


@dataclass(frozen=True, slots=True)
class Ping:
    pass


Message = Union[Auth, Subscribe, Unsubscribe, Ping]


def parse(frame: str | bytes) -> Message:
    """One client frame as a message, or :class:`ProtocolError` saying what is wrong with it."""
    try:
        doc = orjson.loads(frame)
    except orjson.JSONDecodeError as exc:
        raise ProtocolError(f"not JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise ProtocolError("a message is a JSON object")
    kind = doc.get("type")
    if kind == "auth":
        token = doc.get("access_token")
        if not isinstance(token, str) or not token:
            raise ProtocolError("auth needs an access_token string")
        return Auth(token)
    if kind == "subscribe":
        return Subscribe(_uid(doc), _devices(doc.get("devices")), _bbox(doc.get("bbox")))
    if kind == "unsubscribe":
        return Unsubscribe(_uid(doc))
    if kind == "ping":
        return Ping()
    raise ProtocolError(f"unknown message type {str(kind)[:40]!r}: expected auth, subscribe, unsubscribe or ping")


def _uid(doc: dict[str, Any]) -> str:
    uid = doc.get("uid")
    if not isinstance(uid, str) or not 0 < len(uid) <= MAX_UID_CHARS:
        raise ProtocolError(f"uid must be a string of 1-{MAX_UID_CHARS} characters")
    return uid


def _devices(value: Any) -> frozenset[str] | None:
    if value is None:
        return None
    if not isinstance(value, list) or not 0 < len(value) <= MAX_DEVICES_PER_SUBSCRIPTION \
            or not all(isinstance(d, str) and d for d in value):
        raise ProtocolError(f"devices must be a list of 1-{MAX_DEVICES_PER_SUBSCRIPTION} device id strings")
    return frozenset(value)


def _bbox(value: Any) -> tuple[float, float, float, float] | None:
    if value is None:
        return None
    if not isinstance(value, list) or len(value) != 4 or \
            not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value):
        raise ProtocolError("bbox must be [min_lon, min_lat, max_lon, max_lat], four numbers")
    min_lon, min_lat, max_lon, max_lat = (float(v) for v in value)
    if not (-180 <= min_lon <= 180 and -180 <= max_lon <= 180 and -90 <= min_lat <= max_lat <= 90):
        raise ProtocolError("bbox must have longitudes in -180..180 and min_lat <= max_lat within -90..90 "
                            "(min_lon > max_lon crosses the antimeridian)")
    return (min_lon, min_lat, max_lon, max_lat)


# --- outgoing ---

def auth_error(code: str, message: str) -> bytes:
    return orjson.dumps({"type": "auth", "status": "error", "error": {"code": code, "message": message}})


def error(message: str, code: str = INVALID_PAYLOAD) -> bytes:
    return orjson.dumps({"type": "error", "error": {"code": code, "message": message}})


def subscription_frame(uid: str, event: str, positions: Iterable[bytes]) -> bytes:
    """``{"type":"subscription","uid":...,"event":...,"positions":[...]}`` from encoded positions."""
    head = b'{"type":"subscription","uid":' + orjson.dumps(uid) + b',"event":"' + event.encode() + \
        b'","positions":['
    return head + b",".join(positions) + b"]}"
