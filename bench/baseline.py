"""The baseline: the consumer people write first (issue 6, contender 3).

One thread: XREADGROUP a batch, ``json.loads`` each payload, turn the sentinels
into what the processor stores (so both write the same rows), one
``psycopg2.extras.execute_values(... ON CONFLICT DO NOTHING)`` with its default
page size, COMMIT, XACK. No validation, no dead letters, no metrics, no retry:
the code a first version looks like, for the processor's speed to be compared with.

Configured like the service (REDIS_URL, POSTGRES_URL, STREAM_KEY, CONSUMER_GROUP,
CONSUMER_NAME, BATCH_SIZE, BLOCK_MS); runs until SIGTERM or SIGINT.

    python bench/baseline.py
"""

from __future__ import annotations

import base64
import json
import os
import signal
import threading
from datetime import datetime, timedelta, timezone
from typing import Any

import psycopg2
import psycopg2.extras
import redis

EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
SAFE_INTEGER = 2**53 - 1
INSERT_SQL = ("INSERT INTO positions (device_id, ts, latitude, longitude, altitude, angle, speed, satellites, "
              "priority, event_id, attributes) VALUES %s ON CONFLICT (device_id, ts) DO NOTHING")


def unwrap(value: Any) -> Any:
    """Sentinels (CONTRACT 1.1) to what is stored, at any depth (recursive, as a first version would)."""
    if isinstance(value, dict):
        if len(value) == 1 and "__bigint" in value:
            number = int(value["__bigint"])
            return number if abs(number) <= SAFE_INTEGER else str(number)
        if len(value) == 1 and "__buffer" in value:
            return base64.b64decode(value["__buffer"]).hex()
        if value.get("type") == "Buffer" and "data" in value:
            return bytes(value["data"]).hex()
        return {k: unwrap(v) for k, v in value.items()}
    if isinstance(value, list):
        return [unwrap(v) for v in value]
    return value


def timestamp(value: Any) -> datetime:
    if isinstance(value, int):
        return EPOCH + timedelta(milliseconds=value)
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def row(payload: bytes) -> tuple[Any, ...]:
    doc = json.loads(payload)
    return (doc["device_id"], timestamp(doc["timestamp"]), doc["latitude"], doc["longitude"],
            doc.get("altitude"), doc.get("angle"), doc.get("speed"), doc.get("satellites"),
            doc.get("priority"), doc.get("event_id"), json.dumps(unwrap(doc.get("attributes") or {})))


def run(stop: threading.Event) -> None:
    env = os.environ
    stream = env.get("STREAM_KEY", "telemetry:t")
    group = env.get("CONSUMER_GROUP", "processor")
    consumer = env.get("CONSUMER_NAME", "baseline")
    batch_size = int(env.get("BATCH_SIZE", "1000"))
    block_ms = int(env.get("BLOCK_MS", "1000"))
    client = redis.Redis.from_url(env.get("REDIS_URL", "redis://localhost:6379/0"))
    try:
        client.xgroup_create(stream, group, id="0", mkstream=True)
    except redis.ResponseError as exc:
        if "BUSYGROUP" not in str(exc):
            raise
    conn = psycopg2.connect(env.get("POSTGRES_URL", "postgresql://postgres@localhost:5432/postgres"))
    while not stop.is_set():
        reply = client.xreadgroup(group, consumer, {stream: ">"}, count=batch_size, block=block_ms)
        if not reply:
            continue
        entries = reply[0][1]
        rows = [row(fields[b"payload"]) for _, fields in entries]
        with conn.cursor() as cur:
            psycopg2.extras.execute_values(cur, INSERT_SQL, rows)
        conn.commit()
        client.xack(stream, group, *[entry_id for entry_id, _ in entries])
    conn.close()
    client.close()


def main() -> None:
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    run(stop)


if __name__ == "__main__":
    main()
