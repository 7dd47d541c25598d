"""Micro-benchmark of the decoder: microseconds per entry; its typed way (msgspec), its exact way (orjson), json.

Payloads are realistic (~300 bytes): a Teltonika record as tcp-ingestion writes it, IO
elements in ``attributes`` with a ``__bigint`` and a ``__buffer`` sentinel (and, in one
variant, Node's ``{"type": "Buffer"}`` form). Each figure is the best of ``--repeat`` runs
over ``--entries`` distinct entries, one ``decode()`` call per entry, ``now`` passed as the
pipeline does (once per batch). ``decode()`` takes the typed way (msgspec) and falls back to
the exact way (orjson and the documented checks) for what it declines; ``_exact()`` is the
exact way alone (what decode() cost before issue 13); ``decode_batch`` a batch at once, as
the pipeline calls it. The json-module variant lives here only: it swaps the exact way's
parse step and keeps every check, to show what orjson buys.

    /tmp/venv/bin/python bench/micro_decode.py [--entries 5000] [--repeat 7]
"""

from __future__ import annotations

import argparse
import base64
import json
import random
import time
from collections.abc import Callable, Mapping
from datetime import datetime, timedelta, timezone
from typing import Any

import orjson

from processor.core import decode as decode_module
from processor.core.decode import Decoder, dumps_attributes
from processor.core.types import INVALID_JSON, INVALID_TYPE, Position, Rejection

NOW = 1_714_564_800.0  # 2024-05-01T12:00:00Z
BASE = datetime(2024, 5, 1, tzinfo=timezone.utc)


def make_doc(rnd: random.Random, i: int, *, sentinels: str = "both") -> dict[str, Any]:
    """One position as tcp-ingestion publishes it."""
    ts = BASE + timedelta(milliseconds=i * 1000 + rnd.randint(0, 999))
    attributes: dict[str, Any] = {
        "21": rnd.randint(1, 5), "66": rnd.randint(11000, 14000), "67": rnd.randint(3800, 4200),
        "240": rnd.randint(0, 1), "16": rnd.randint(0, 10**9),
    }
    if sentinels in ("both", "node"):
        attributes["11"] = {"__bigint": str(rnd.randint(2**60, 2**63))}
        attributes["78"] = {"__buffer": base64.b64encode(rnd.randbytes(8)).decode()}
    if sentinels == "node":
        attributes["385"] = {"type": "Buffer", "data": list(rnd.randbytes(6))}
    return {
        "device_id": f"35630704{i % 200:07d}",
        "timestamp": ts.isoformat(timespec="milliseconds").replace("+00:00", "Z") if i % 2
        else int(ts.timestamp() * 1000),
        "latitude": round(54.0 + rnd.random(), 7), "longitude": round(25.0 + rnd.random(), 7),
        "altitude": rnd.randint(50, 300), "angle": rnd.randint(0, 359), "speed": rnd.randint(0, 120),
        "satellites": rnd.randint(4, 20), "priority": rnd.randint(0, 1), "event_id": rnd.choice((0, 0, 240)),
        "attributes": attributes,
    }


def make_entries(n: int, **kwargs: Any) -> list[dict[bytes, bytes]]:
    rnd = random.Random(42)
    return [{b"payload": orjson.dumps(make_doc(rnd, i, **kwargs))} for i in range(n)]


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


class JsonModuleDecoder(Decoder):
    """The product decoder's exact way with the standard json module as its parser (benchmark only)."""

    def decode(self, fields: Mapping[bytes, bytes], now: float | None = None) -> Position | Rejection:
        try:
            raw = self._payload(fields)
            try:
                doc = json.loads(raw, parse_constant=_reject_constant)
            except ValueError as exc:
                return Rejection(INVALID_JSON, str(exc)[:200])
            if type(doc) is not dict:
                return Rejection(INVALID_TYPE, "payload is not an object")
            if b"\\u0000" in raw:
                decode_module._check_nul(doc)
            return self._position(doc, time.time() if now is None else now)
        except decode_module._Invalid as exc:
            return Rejection(exc.reason, exc.detail[:200])


def per_call_us(function: Callable[[Any], Any], items: list[Any], repeat: int) -> float:
    """Best-of-``repeat`` microseconds per call of ``function`` over ``items``."""
    best = float("inf")
    for _ in range(repeat):
        started = time.perf_counter_ns()
        for item in items:
            function(item)
        best = min(best, (time.perf_counter_ns() - started) / len(items) / 1000)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entries", type=int, default=5000)
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args()

    entries = make_entries(args.entries)
    flat = make_entries(args.entries, sentinels="none")
    node = make_entries(args.entries, sentinels="node")
    sizes = [len(entry[b"payload"]) for entry in entries]
    decoder, json_decoder = Decoder(), JsonModuleDecoder()
    sample = decoder.decode(entries[1], now=NOW)
    assert isinstance(sample, Position), sample
    assert json_decoder.decode(entries[1], now=NOW) == sample  # same result, other parser
    attributes = [decoder.decode(entry, now=NOW).attributes for entry in entries]  # type: ignore[union-attr]

    print(f"payloads: {len(entries)} entries, {min(sizes)}-{max(sizes)} bytes (mean {sum(sizes) / len(sizes):.0f})")
    print(f"example: {entries[1][b'payload'].decode()}")
    rows: list[tuple[str, Callable[[Any], Any] | None, list[Any]]] = [
        ("parse only: orjson.loads", lambda e: orjson.loads(e[b"payload"]), entries),
        ("parse only: json.loads", lambda e: json.loads(e[b"payload"]), entries),
        ("parse and check only: msgspec typed", lambda e: decode_module._TYPED_DECODE(e[b"payload"]), entries),
        ("decode(), __bigint + __buffer", lambda e: decoder.decode(e, NOW), entries),
        ("decode_batch, per entry, __bigint + __buffer", None, entries),
        ("_exact() (orjson), __bigint + __buffer", lambda e: decoder._exact(e, NOW), entries),
        ("_exact(), json module, __bigint + __buffer", lambda e: json_decoder.decode(e, NOW), entries),
        ("decode(), no sentinels", lambda e: decoder.decode(e, NOW), flat),
        ("decode(), + Node Buffer sentinel", lambda e: decoder.decode(e, NOW), node),
        ("dumps_attributes (orjson)", dumps_attributes, attributes),
        ("json.dumps attributes (compact)",
         lambda a: json.dumps(a, separators=(",", ":"), ensure_ascii=False), attributes),
    ]
    for label, function, items in rows:
        if function is None:  # the batch call: time per entry of one call over all of them
            us = per_call_us(lambda batch: decoder.decode_batch(batch, NOW), [items], args.repeat) / len(items)
        else:
            us = per_call_us(function, items, args.repeat)
        print(f"{label:<46} {us:7.2f} us/call")


if __name__ == "__main__":
    main()
