"""What is specific to TimescaleDB, production's database (issue 12).

The rest of the suite already runs on a hypertable too (the ``timescaledb`` backend of
conftest.py); these tests check what only a hypertable has: its chunks, that the same
schema comes out of ``migrate`` and ``psql -f schema.sql``, that both COPY paths of the
writer route rows into chunks, and that a late position lands in the chunk of its day.
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from datetime import datetime, timedelta, timezone
from typing import Any, Iterator

import psycopg2
import pytest

from processor.core.types import DUPLICATE, INSERTED, Position, Record
from processor.core.writer import COPY_SQL, DIRECT_COPY_SQL, Writer
from tests.helpers import (ROOT, InProcessService, config_for, payload, pending_count, publish, row_count,
                           wait_until)

pytestmark = pytest.mark.backends("timescaledb")

DAY = timedelta(days=1)
# 30 whole UTC days that end before yesterday: inside the decoder's window, one chunk each
# (1-day chunks are aligned to UTC midnight).
FIRST_DAY = datetime.now(timezone.utc).replace(hour=0, minute=0, second=0, microsecond=0) - 31 * DAY
DAYS = 30
DEVICES = 10
# Three positions a device a day: both edges of the day and noon.
OFFSETS = (timedelta(0), timedelta(hours=12), DAY - timedelta(milliseconds=1))


def _query(url: str, sql: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    conn = psycopg2.connect(url)
    try:
        with conn.cursor() as cur:
            cur.execute(sql, args)
            return cur.fetchall()
    finally:
        conn.close()


def _dimensions(url: str) -> list[tuple[Any, ...]]:
    return _query(url, """SELECT column_name, column_type::text, dimension_type, time_interval, num_partitions
                          FROM timescaledb_information.dimensions
                          WHERE hypertable_schema = 'public' AND hypertable_name = 'positions'""")


def _chunks(url: str) -> list[tuple[str, datetime, datetime]]:
    """(chunk, range start, range end) of positions, oldest first."""
    return _query(url, """SELECT chunk_schema || '.' || chunk_name, range_start, range_end
                          FROM timescaledb_information.chunks
                          WHERE hypertable_schema = 'public' AND hypertable_name = 'positions'
                          ORDER BY range_start""")


def _chunk_of(url: str, device_id: str, ts: datetime) -> str:
    rows = _query(url, "SELECT tableoid::regclass::text FROM positions WHERE device_id = %s AND ts = %s",
                  (device_id, ts))
    assert len(rows) == 1, rows
    return rows[0][0]


def _ms(ts: datetime) -> int:
    return int(ts.timestamp() * 1000)


def _day_start(ts: datetime) -> datetime:
    return ts.replace(hour=0, minute=0, second=0, microsecond=0)


def _table_definition(url: str) -> dict[str, Any]:
    """Everything that makes positions what it is, with names that differ between databases left out."""
    return {
        "columns": _query(url, """SELECT column_name, data_type, is_nullable, column_default
                                  FROM information_schema.columns
                                  WHERE table_schema = 'public' AND table_name = 'positions'
                                  ORDER BY ordinal_position"""),
        "constraints": _query(url, """SELECT conname, contype, pg_get_constraintdef(oid) FROM pg_constraint
                                      WHERE conrelid = 'public.positions'::regclass ORDER BY conname"""),
        "indexes": _query(url, """SELECT indexname, indexdef FROM pg_indexes
                                  WHERE schemaname = 'public' AND tablename = 'positions' ORDER BY indexname"""),
        "triggers": _query(url, """SELECT tgname, pg_get_triggerdef(oid) FROM pg_trigger
                                   WHERE tgrelid = 'public.positions'::regclass ORDER BY tgname"""),
        "dimensions": _dimensions(url),
        "extension": _query(url, "SELECT extname, extversion FROM pg_extension WHERE extname = 'timescaledb'"),
        "tables": _query(url, """SELECT table_name FROM information_schema.tables
                                 WHERE table_schema = 'public' ORDER BY table_name"""),
    }


@pytest.fixture
def two_empty_databases(pg_admin_url: str) -> Iterator[tuple[str, str]]:
    """Two fresh databases without any schema on the TimescaleDB server."""
    names = [f"tp_{uuid.uuid4().hex[:12]}" for _ in range(2)]
    admin = psycopg2.connect(pg_admin_url)
    admin.autocommit = True
    base = pg_admin_url.rsplit("/", 1)[0]
    try:
        with admin.cursor() as cur:
            for name in names:
                cur.execute(f'CREATE DATABASE "{name}"')
        yield f"{base}/{names[0]}", f"{base}/{names[1]}"
    finally:
        with admin.cursor() as cur:
            for name in names:
                cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()


def _cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    full = {k: v for k, v in os.environ.items() if not k.startswith(("REDIS_", "POSTGRES_"))}
    full.update(env, LOG_FORMAT="text")
    return subprocess.run([sys.executable, str(ROOT / "processor.py"), *args], env=full, cwd=str(ROOT),
                          capture_output=True, text=True, timeout=60)


# --- the schema ----------------------------------------------------------------------------

def test_migrate_makes_positions_a_hypertable_on_ts_with_1_day_chunks(empty_pg_url: str) -> None:
    result = _cli("migrate", env={"POSTGRES_URL": empty_pg_url})
    assert result.returncode == 0, result.stderr
    assert "migrations applied: positions is a TimescaleDB hypertable" in result.stderr
    assert _dimensions(empty_pg_url) == [("ts", "timestamp with time zone", "Time", DAY, None)]
    assert _query(empty_pg_url, "SHOW timescaledb.license") == [("apache",)]
    assert _chunks(empty_pg_url) == []  # no row, no chunk


def test_psql_f_schema_sql_gives_the_table_migrate_gives(two_empty_databases: tuple[str, str]) -> None:
    by_migrate, by_psql = two_empty_databases
    assert _cli("migrate", env={"POSTGRES_URL": by_migrate}).returncode == 0
    result = subprocess.run(["psql", "-X", "-v", "ON_ERROR_STOP=1", "-q", "-f", str(ROOT / "schema.sql"), by_psql],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "WARNING" not in result.stderr and "not enabled" not in result.stderr, result.stderr
    expected, got = _table_definition(by_migrate), _table_definition(by_psql)
    assert got == expected
    assert got["dimensions"] == [("ts", "timestamp with time zone", "Time", DAY, None)]
    assert got["tables"] == [("positions",)]  # the extension's own tables live in its schemas
    assert [c[1] for c in got["constraints"]] == ["p"]


# --- chunks, end to end --------------------------------------------------------------------

def _thirty_days() -> tuple[list[bytes], list[bytes], dict[tuple[str, datetime], float]]:
    """900 positions over 30 days (``firsts``), then 300 rewrites of the keys on the chunk edges (``again``),
    and the speed each key must keep (the first stored wins)."""
    firsts, again, speeds = [], [], {}
    for day in range(DAYS):
        for device in range(DEVICES):
            device_id = f"tsdb{device:02d}"
            for k, offset in enumerate(OFFSETS):
                ts = FIRST_DAY + day * DAY + offset
                speed = float(day * 10 + k)
                firsts.append(payload(device_id, _ms(ts), speed=speed))
                speeds[(device_id, ts)] = speed
            # The same key as the first position of the day, in the same chunk: a duplicate.
            again.append(payload(device_id, _ms(FIRST_DAY + day * DAY), speed=999.0))
    return firsts, again, speeds


def test_thirty_days_give_thirty_chunks_and_duplicates_are_absorbed_across_chunks(
        redis_url: str, redis_client: Any, pg_url: str, keys: dict[str, str]) -> None:
    firsts, again, speeds = _thirty_days()
    # Published before the start: batches of 500 that each span several chunks, the rewrites mixed in.
    # One writer thread: batches are stored in stream order, so "the first stored wins" is the first published.
    publish(redis_client, keys["stream"], firsts[:600] + again[:150] + firsts[600:] + again[150:])
    config = config_for(redis_url, pg_url, keys, batch_size=500, writer_threads=1)
    with InProcessService(config) as svc:
        wait_until(lambda: svc.sample("processor_acks_total") == 1200, 60, 0.1, "1,200 acknowledgements")
        inserted = svc.sample("processor_records_written_total", {"status": "inserted"})
        duplicate = svc.sample("processor_records_written_total", {"status": "duplicate"})
    assert svc.exit_code == 0
    assert (inserted, duplicate) == (900, 300)
    assert pending_count(redis_client, keys["stream"], keys["group"]) == 0
    assert redis_client.xlen(keys["dead"]) == 0

    chunks = _chunks(pg_url)
    assert [(start, end) for _, start, end in chunks] == [(FIRST_DAY + d * DAY, FIRST_DAY + (d + 1) * DAY)
                                                          for d in range(DAYS)]
    per_chunk = _query(pg_url, "SELECT tableoid::regclass::text, count(*) FROM positions GROUP BY 1 ORDER BY 1")
    assert sorted(n for _, n in per_chunk) == [DEVICES * len(OFFSETS)] * DAYS
    assert {name for name, _ in per_chunk} == {name for name, _, _ in chunks}
    stored = {(d, ts): speed for d, ts, speed in _query(pg_url, "SELECT device_id, ts, speed FROM positions")}
    assert stored == speeds  # every key once, with the speed of its first publication
    # The last millisecond of a day and the first of the next are two rows in two chunks.
    edge = FIRST_DAY + 5 * DAY
    assert _chunk_of(pg_url, "tsdb03", edge - timedelta(milliseconds=1)) != _chunk_of(pg_url, "tsdb03", edge)


def test_a_late_position_is_written_into_the_old_chunk_of_its_day(
        redis_url: str, redis_client: Any, pg_url: str, keys: dict[str, str]) -> None:
    firsts, _, _ = _thirty_days()
    publish(redis_client, keys["stream"], firsts)
    late = FIRST_DAY + 2 * DAY + timedelta(hours=6, milliseconds=250)
    older = FIRST_DAY - 3 * DAY + timedelta(hours=1)  # before every chunk: a new one for it
    with InProcessService(config_for(redis_url, pg_url, keys)) as svc:
        wait_until(lambda: svc.sample("processor_acks_total") == 900, 60, 0.1, "900 acknowledgements")
        before = _chunks(pg_url)
        newest = svc.service.state.get("tsdb07").last_position.ts
        publish(redis_client, keys["stream"], [payload("tsdb07", _ms(late), speed=1.5),
                                               payload("tsdb07", _ms(older), speed=2.5)])
        wait_until(lambda: svc.sample("processor_acks_total") == 902, 30, 0.05, "the late positions")
        assert svc.sample("processor_records_written_total", {"status": "inserted"}) == 902
        # Late positions count, but the device's last position only moves forward (CONTRACT 4, rule 9).
        assert svc.service.state.get("tsdb07").last_position.ts == newest == FIRST_DAY + 29 * DAY + OFFSETS[2]
    assert svc.exit_code == 0
    after = _chunks(pg_url)
    day_chunk = next(name for name, start, end in before if start <= late < end)
    assert _chunk_of(pg_url, "tsdb07", late) == day_chunk  # the chunk that was already there
    assert len(after) == len(before) + 1 == DAYS + 1
    assert after[0][1:] == (_day_start(older), _day_start(older) + DAY)
    assert _chunk_of(pg_url, "tsdb07", older) == after[0][0]
    assert row_count(pg_url) == 902
    assert _query(pg_url, "SELECT speed FROM positions WHERE device_id = 'tsdb07' AND ts IN (%s, %s) ORDER BY ts",
                  (older, late)) == [(2.5,), (1.5,)]


# --- the writer's paths on a hypertable ----------------------------------------------------

def _records(days: range, tag: str, per_day: int = 20) -> list[Record]:
    out = []
    for day in days:
        for i in range(per_day):
            ts = FIRST_DAY + day * DAY + timedelta(minutes=37 * i)
            out.append(Record(f"{_ms(ts)}-{i}", Position(device_id=f"w{i % 4}", ts=ts, latitude=54.0 + day,
                                                         longitude=25.0 + i / 100, speed=float(i),
                                                         attributes={"tag": tag})))
    return out


def _statements(server_log: str, sql: str) -> int:
    """How often the server ran ``sql`` (log_statement lines; a failed one is repeated after its ERROR)."""
    return server_log.count(f"LOG:  statement: {sql}")


def test_direct_copy_and_staging_both_write_into_the_chunks(throwaway_postgres_factory: Any) -> None:
    # A server of our own that logs every statement: it shows which path each batch took.
    pg = throwaway_postgres_factory(settings={"log_statement": "all"})
    writer = Writer(dsn=pg.url, threads=1)
    writer.start()
    try:
        fresh = _records(range(0, 5), "fresh")  # 100 new keys over 5 days: straight COPY into positions
        assert writer.write(fresh) == [INSERTED] * 100
        log = pg.log_file.read_text(errors="replace")
        assert (_statements(log, DIRECT_COPY_SQL), _statements(log, COPY_SQL)) == (1, 0)

        # Half already stored, half new on 2 more days: the direct COPY fails on a duplicate key,
        # is rolled back, and the batch goes through the staging table.
        mixed = _records(range(3, 5), "again") + _records(range(5, 7), "new")
        assert writer.write(mixed) == [DUPLICATE] * 40 + [INSERTED] * 40
        log = pg.log_file.read_text(errors="replace")
        assert (_statements(log, DIRECT_COPY_SQL), _statements(log, COPY_SQL)) == (2, 1)
        assert log.count("ERROR:  duplicate key value violates unique constraint") == 1

        # A late small batch into old chunks: the VALUES path.
        late = _records(range(1, 2), "late", per_day=5)
        late = [Record(r.entry_id + "l", Position(device_id="late", ts=r.position.ts, latitude=1.0, longitude=2.0))
                for r in late]
        assert writer.write(late) == [INSERTED] * 5
    finally:
        writer.close(10)

    assert row_count(pg.url) == 145
    assert len(_chunks(pg.url)) == 7
    assert _query(pg.url, "SELECT coalesce(attributes->>'tag', '-'), count(*) FROM positions GROUP BY 1 ORDER BY 1"
                  ) == [("-", 5), ("fresh", 100), ("new", 40)]
    assert "ERROR:" not in log.replace("ERROR:  duplicate key value violates unique constraint", "")
