"""Micro-benchmark of the PostgreSQL writer: rows/s by batch size, VALUES path vs COPY path.

Sets ``processor.core.writer.COPY_THRESHOLD``. Each point writes fresh rows
(~300 bytes, with attributes) into a freshly truncated ``positions`` table of a
throw-away database, from one thread, one ``Writer.write()`` per batch (row
formatting, round trips and commit included), alternating the two paths, until
``--seconds`` or ``--max-rows`` is reached; see :func:`measure`.

    /tmp/venv/bin/python bench/micro_writer.py [--dsn URL] [--seconds 2] [--max-rows 60000]
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import time
import uuid
from datetime import datetime, timedelta, timezone
from urllib.parse import urlsplit, urlunsplit

import orjson
import psycopg2

from processor.core.db import schema_sql
from processor.core.types import Position, Record
from processor.core.writer import Writer, _copy_text

SIZES = (1, 10, 50, 100, 250, 500, 1000, 2000, 5000)
BASE = datetime(2024, 1, 1, tzinfo=timezone.utc)


def make_records(n: int, start: int = 0) -> list[Record]:
    """``n`` realistic positions: 200 devices, IO elements as tcp-ingestion sends them."""
    rnd = random.Random(start)
    out = []
    for i in range(start, start + n):
        attrs = {"21": rnd.randint(1, 5), "66": rnd.randint(11000, 14000), "67": rnd.randint(3800, 4200),
                 "68": 0, "69": 1, "239": 1, "240": rnd.randint(0, 1), "16": rnd.randint(0, 10**9),
                 "181": rnd.randint(5, 30), "182": rnd.randint(5, 30), "200": 0, "241": 24601,
                 "11": "8944501234567890123", "78": "0a1b2c3d4e5f6071", "9": rnd.randint(0, 4000)}
        pos = Position(device_id=f"35630704{i % 200:07d}", ts=BASE + timedelta(seconds=i),
                       latitude=54.0 + rnd.random(), longitude=25.0 + rnd.random(),
                       altitude=float(rnd.randint(50, 300)), angle=float(rnd.randint(0, 359)),
                       speed=float(rnd.randint(0, 120)), satellites=rnd.randint(4, 20),
                       priority=rnd.randint(0, 1), event_id=rnd.choice((0, 0, 0, 240, 239)),
                       attributes=attrs)
        out.append(Record(entry_id=f"{1700000000000 + i}-0", position=pos, payload=b""))
    return out


def row_bytes(records: list[Record]) -> float:
    return len(_copy_text(records)) / len(records)


def measure(dsn: str, size: int, seconds: float, max_rows: int) -> tuple[float, float]:
    """rows/s of the VALUES path and of the COPY path for one batch size.

    The two paths take turns, batch by batch, on the same freshly truncated
    table, and each figure is ``size / median batch time``: the machine is shared,
    and interleaving plus the median keep the noise (other processes, a
    checkpoint) from favouring either path.
    """
    conn = psycopg2.connect(dsn)
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute("TRUNCATE positions")
        cur.execute("CHECKPOINT")
    conn.close()
    n_batches = max(2, max_rows // size)
    records = make_records(n_batches * size)
    writers = {"values": Writer(dsn=dsn, threads=1, copy_threshold=10**9),
               "copy": Writer(dsn=dsn, threads=1, copy_threshold=1)}
    times: dict[str, list[float]] = {"values": [], "copy": []}
    for warm_up, writer in enumerate(writers.values()):
        writer.write(make_records(1, start=10**7 + warm_up))  # connection set up outside the timing
    started = time.perf_counter()
    for b in range(n_batches):
        path = ("values", "copy")[b % 2]
        t0 = time.perf_counter()
        results = writers[path].write(records[b * size:(b + 1) * size])
        times[path].append(time.perf_counter() - t0)
        assert all(r.stored for r in results), results[:3]
        if time.perf_counter() - started > seconds and len(times["copy"]) >= 3:
            break
    for writer in writers.values():
        writer.close(5)
    return size / statistics.median(times["values"]), size / statistics.median(times["copy"])


def format_cost(n: int = 20000) -> tuple[float, float]:
    """Microseconds per row to build the COPY text and the VALUES argument tuples (no I/O)."""
    records = make_records(n)
    t0 = time.perf_counter()
    _copy_text(records)
    t1 = time.perf_counter()
    dumps = orjson.dumps
    [(p.device_id, p.ts, p.latitude, p.longitude, p.altitude, p.angle, p.speed, p.satellites,
      p.priority, p.event_id, dumps(p.attributes).decode()) for p in [r.position for r in records]]
    t2 = time.perf_counter()
    return (t1 - t0) / n * 1e6, (t2 - t1) / n * 1e6


def fresh_database(admin: str) -> tuple[str, str]:
    name = f"bench_writer_{uuid.uuid4().hex[:8]}"
    conn = psycopg2.connect(admin)
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute(f'CREATE DATABASE "{name}"')
    conn.close()
    url = urlunsplit(urlsplit(admin)._replace(path="/" + name))
    conn = psycopg2.connect(url)
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute(schema_sql())
    conn.close()
    return name, url


def drop_database(admin: str, name: str) -> None:
    conn = psycopg2.connect(admin)
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    conn.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dsn", default=os.environ.get("TEST_POSTGRES_URL",
                                                        "postgresql://postgres@127.0.0.1:5432/postgres"))
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--max-rows", type=int, default=60000)
    parser.add_argument("--sizes", default=",".join(map(str, SIZES)))
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    name, url = fresh_database(args.dsn)
    try:
        copy_us, values_us = format_cost()
        print(f"row size in COPY text: {row_bytes(make_records(1000)):.0f} bytes; build cost per row: "
              f"COPY text {copy_us:.1f} us, VALUES tuples {values_us:.1f} us")
        print(f"{'batch':>6} {'VALUES rows/s':>14} {'COPY rows/s':>12} {'COPY/VALUES':>12}")
        for size in sizes:
            values, copy = measure(url, size, args.seconds, args.max_rows)
            print(f"{size:>6} {values:>14,.0f} {copy:>12,.0f} {copy / values:>12.2f}", flush=True)
    finally:
        drop_database(args.dsn, name)


if __name__ == "__main__":
    main()
