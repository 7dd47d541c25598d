"""The PostgreSQL writer against a real PostgreSQL: both insert paths, row faults, transient failures, threads."""

from __future__ import annotations

import logging
import re
import threading
import time
from concurrent.futures import TimeoutError as FutureTimeout
from datetime import datetime, timedelta, timezone
from typing import Any, Iterator

import psycopg2
import pytest
from prometheus_client import CollectorRegistry

from processor.core.errors import TransientError
from processor.core.metrics import Metrics
from processor.core.types import DUPLICATE, INSERTED, Position, Record, WriteResult, WriteStatus
from processor.core.writer import Writer

from .helpers import free_port, wait_until

BASE = datetime(2024, 3, 1, 12, 0, tzinfo=timezone.utc)
IMEI = "356307042441013"
# copy_threshold=1 sends every batch through COPY; 10**9 sends every batch through VALUES.
PATHS = pytest.mark.parametrize("threshold", [1, 10**9], ids=["copy", "values"])
ROW_SQL = ("SELECT device_id, ts, latitude, longitude, altitude, angle, speed, satellites, priority, event_id, "
           "attributes FROM positions ORDER BY device_id, ts")
ATTRIBUTES = {
    "1": 1, "2": -2.5, "3": True, "4": None, "5": [1, "two", {"3": [None]}],
    "nested": {"deeper": {"deepest": "ok"}, "list": []},
    "unicode": "Vilnius — Šiauliai ✓ 北京 🚚",
    "escapes": "tab\there\nnewline\rcarriage\\backslash \"quote\" 'single'",
    "copy null": "\\N",
    "alone": "\t",
    "16": 9007199254740991,
    "78": "0a1b2c3d4e5f6071",
}
TRICKY_DEVICE = "dev\tice\nline\\slash\"quote\\N\r"


def pos(device_id: str = IMEI, second: int = 0, **fields: Any) -> Position:
    values: dict[str, Any] = {"latitude": 54.6872, "longitude": 25.2797}
    values.update(fields)
    return Position(device_id=device_id, ts=BASE + timedelta(seconds=second), **values)


def rec(device_id: str = IMEI, second: int = 0, **fields: Any) -> Record:
    return Record(entry_id=f"{1709294400000 + second}-{len(device_id)}", position=pos(device_id, second, **fields))


def batch(n: int, start: int = 0, device_id: str = IMEI) -> list[Record]:
    return [rec(device_id, start + i, speed=float(i), attributes={"i": i}) for i in range(n)]


def rows(conn: Any) -> list[tuple[Any, ...]]:
    with conn.cursor() as cur:
        cur.execute(ROW_SQL)
        return cur.fetchall()


def count(conn: Any) -> int:
    with conn.cursor() as cur:
        cur.execute("SELECT count(*) FROM positions")
        return int(cur.fetchone()[0])


def statuses(results: list[WriteResult]) -> list[str]:
    return [r.status.value + ("/transient" if r.transient else "") for r in results]


def writer_backends(conn: Any) -> list[int]:
    with conn.cursor() as cur:
        cur.execute("SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
                    "AND application_name = 'telemetry-processor'")
        return [r[0] for r in cur.fetchall()]


def terminate_writer_backends(conn: Any) -> None:
    """Kill every writer connection to this database and wait until they are gone."""
    pids = writer_backends(conn)
    assert pids, "the writer has no connection to terminate"
    with conn.cursor() as cur:
        cur.execute("SELECT pg_terminate_backend(pid) FROM unnest(%s::int[]) AS pid", (pids,))
    wait_until(lambda: not set(pids) & set(writer_backends(conn)), timeout=10, message="backends gone")


def closed_port_dsn(password: str | None = None) -> str:
    user = "postgres" if password is None else f"postgres:{password}"
    return f"postgresql://{user}@127.0.0.1:{free_port()}/postgres"


@pytest.fixture
def make_writer() -> Iterator[Any]:
    """Build writers that are closed after the test, so the test database can be dropped."""
    made: list[Writer] = []

    def make(dsn: str, **kwargs: Any) -> Writer:
        kwargs.setdefault("backoff_start", 0.05)
        kwargs.setdefault("backoff_max", 0.2)
        writer = Writer(dsn=dsn, **kwargs)
        made.append(writer)
        return writer

    yield make
    for writer in made:
        writer.cancel_retries()
        writer.close(5)


@pytest.fixture
def metrics() -> Metrics:
    return Metrics(registry=CollectorRegistry())


def sample(m: Metrics, name: str, **labels: str) -> float:
    value = m.registry.get_sample_value(name, labels)
    assert value is not None, name
    return value


# --- outcomes ----------------------------------------------------------------------------

@PATHS
def test_new_rows_are_inserted_and_rewrites_are_duplicates(pg_url: str, pg_conn: Any, make_writer: Any,
                                                           threshold: int) -> None:
    writer = make_writer(pg_url, copy_threshold=threshold)
    records = batch(50)
    assert writer.write(records) == [INSERTED] * 50
    assert count(pg_conn) == 50
    assert writer.write(records) == [DUPLICATE] * 50
    assert count(pg_conn) == 50
    assert writer.write([]) == []


@PATHS
def test_first_record_of_a_key_wins_within_a_batch_and_against_the_table(
        pg_url: str, pg_conn: Any, make_writer: Any, threshold: int) -> None:
    writer = make_writer(pg_url, copy_threshold=threshold)
    assert writer.write([rec("stored", 0, speed=1.0)]) == [INSERTED]
    results = writer.write([
        rec(IMEI, 0, speed=10.0),      # new key
        rec("stored", 0, speed=2.0),   # already in the table
        rec(IMEI, 1, speed=11.0),      # new key
        rec(IMEI, 0, speed=99.0),      # same key as the first record of the batch
        rec(IMEI, 0, speed=98.0),      # and again
    ])
    assert results == [INSERTED, DUPLICATE, INSERTED, DUPLICATE, DUPLICATE]
    assert [(r[0], r[1].second, r[6]) for r in rows(pg_conn)] == [(IMEI, 0, 10.0), (IMEI, 1, 11.0),
                                                                   ("stored", 0, 1.0)]


@PATHS
def test_values_round_trip_exactly(pg_url: str, pg_conn: Any, make_writer: Any, threshold: int) -> None:
    writer = make_writer(pg_url, copy_threshold=threshold)
    full = Position(device_id=TRICKY_DEVICE, ts=BASE.replace(microsecond=123456), latitude=-89.123456789012345,
                    longitude=179.98765432109876, altitude=123.5, angle=359.75, speed=0.0, satellites=0,
                    priority=2, event_id=2_000_000_000, attributes=ATTRIBUTES)
    bare = Position(device_id="\\N", ts=BASE, latitude=0.1, longitude=-0.2)
    empty = Position(device_id="empty-attrs", ts=BASE, latitude=1.0, longitude=2.0, attributes={})
    assert writer.write([Record("1-0", full), Record("2-0", bare), Record("3-0", empty)]) == [INSERTED] * 3
    assert rows(pg_conn) == [
        ("\\N", BASE, 0.1, -0.2, None, None, None, None, None, None, {}),
        (TRICKY_DEVICE, BASE.replace(microsecond=123456), -89.123456789012345, 179.98765432109876, 123.5, 359.75,
         0.0, 0, 2, 2_000_000_000, ATTRIBUTES),
        ("empty-attrs", BASE, 1.0, 2.0, None, None, None, None, None, None, {}),
    ]
    # The tricky key maps back to its record: a rewrite is a duplicate, not an insert.
    assert writer.write([Record("1-1", full), Record("4-0", bare)]) == [DUPLICATE, DUPLICATE]


def test_both_paths_store_identical_rows(pg_url: str, pg_conn: Any, make_writer: Any) -> None:
    records = [Record("1-0", pos(TRICKY_DEVICE, 0, attributes=ATTRIBUTES, altitude=1.5, satellites=7)),
               Record("2-0", pos("\\N", 1)),
               *batch(30, start=100),
               Record("3-0", pos(TRICKY_DEVICE, 0, speed=5.0)),
               Record("4-0", pos("x y", 2, angle=0.5, priority=0, event_id=0, attributes={"q": "\\\t"}))]
    outcome = {}
    for threshold in (1, 10**9):
        results = make_writer(pg_url, copy_threshold=threshold).write(records)
        outcome[threshold] = (results, rows(pg_conn))
        with pg_conn.cursor() as cur:
            cur.execute("TRUNCATE positions")
    assert outcome[1] == outcome[10**9]
    assert outcome[1][0].count(DUPLICATE) == 1 and len(outcome[1][1]) == 33


def test_a_trigger_that_skips_rows_leaves_the_rest_stored_once(pg_url: str, pg_conn: Any, make_writer: Any,
                                                                metrics: Metrics) -> None:
    """The direct COPY commits as it ends (one statement in autocommit); when a trigger skipped
    rows, the batch goes the staging way, which finds the others stored: counted as duplicates."""
    with pg_conn.cursor() as cur:
        cur.execute("CREATE FUNCTION skip_fast() RETURNS trigger LANGUAGE plpgsql AS "
                    "$$ BEGIN IF NEW.speed >= 18 THEN RETURN NULL; END IF; RETURN NEW; END $$")
        cur.execute("CREATE TRIGGER skip_fast BEFORE INSERT ON positions FOR EACH ROW EXECUTE FUNCTION skip_fast()")
    writer = make_writer(pg_url, copy_threshold=1, metrics=metrics)
    assert writer.write(batch(20)) == [DUPLICATE] * 20
    assert [r[6] for r in rows(pg_conn)] == [float(i) for i in range(18)]
    assert sample(metrics, "processor_records_written_total", status="duplicate") == 20
    # the direct way rests after that: the next batch goes straight to staging, exactly counted
    assert writer.write(batch(3, start=100)) == [INSERTED] * 3
    assert count(pg_conn) == 21


# --- rows the database rejects -----------------------------------------------------------

# The relation PostgreSQL names when it refuses a row: on a hypertable, the chunk the row was routed to.
REFUSING_RELATION = {"plain": "positions", "timescaledb": r"_hyper_\d+_\d+_chunk"}


@PATHS
def test_a_rejected_row_does_not_sink_the_batch(pg_url: str, pg_conn: Any, make_writer: Any, threshold: int,
                                                caplog: pytest.LogCaptureFixture, pg_backend: str) -> None:
    with pg_conn.cursor() as cur:
        cur.execute("ALTER TABLE positions ADD CONSTRAINT no_bad CHECK (device_id <> 'bad')")
    records = batch(1000)
    records[437] = rec("bad", 437)
    writer = make_writer(pg_url, copy_threshold=threshold)
    with caplog.at_level(logging.WARNING, logger="processor.core.writer"):
        results = writer.write(records)
    failed = results.pop(437)
    assert results == [INSERTED] * 999
    assert failed.status is WriteStatus.FAILED and failed.transient is False
    relation = REFUSING_RELATION[pg_backend]
    assert re.fullmatch(f'new row for relation "{relation}" violates check constraint "no_bad"', failed.error), \
        failed.error
    assert count(pg_conn) == 999
    assert [r.getMessage() for r in caplog.records] == [
        f'row rejected by PostgreSQL, entry {records[437].entry_id}: {failed.error}']
    assert writer.healthy and writer.last_error is None


@PATHS
@pytest.mark.parametrize("bad", [(3, 4), (0, 99)], ids=["adjacent", "first-and-last"])
def test_two_rejected_rows_and_duplicates_across_the_split(pg_url: str, pg_conn: Any, make_writer: Any,
                                                           threshold: int, bad: tuple[int, int]) -> None:
    with pg_conn.cursor() as cur:
        cur.execute("ALTER TABLE positions ADD CONSTRAINT no_bad CHECK (device_id <> 'bad')")
    records = batch(100)
    for i in bad:
        records[i] = rec("bad", i)
    records[60] = rec(IMEI, 10, speed=-1.0)  # same key as records[10]: lands in the other half
    results = make_writer(pg_url, copy_threshold=threshold).write(records)
    expected = ["inserted"] * 100
    for i in bad:
        expected[i] = "failed"
    expected[60] = "duplicate"
    assert statuses(results) == expected
    assert count(pg_conn) == 97
    with pg_conn.cursor() as cur:
        cur.execute("SELECT speed FROM positions WHERE ts = %s", (BASE + timedelta(seconds=10),))
        assert cur.fetchone() == (10.0,)


@PATHS
@pytest.mark.parametrize(("bad_fields", "message"), [
    ({"satellites": 70_000}, "out of range"),
    ({"event_id": 2**40}, "out of range"),
    ({"altitude": 1e39}, "out of range"),
    ({"speed": 666.0}, "speed of the beast"),
    ({"attributes": {"big": 2**70}}, "attributes cannot be encoded as JSON"),
    ({"attributes": {"nul": "a\x00b"}}, "Unicode"),
    ({"device_id": "nul\x00"}, "0x00"),
], ids=["smallint", "integer", "real", "trigger-raise", "json-encode", "jsonb-nul", "text-nul"])
def test_every_kind_of_row_fault_is_isolated(pg_url: str, pg_conn: Any, make_writer: Any, threshold: int,
                                             bad_fields: dict[str, Any], message: str) -> None:
    with pg_conn.cursor() as cur:
        cur.execute("""
            CREATE FUNCTION beast() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN
                IF NEW.speed = 666 THEN RAISE EXCEPTION 'speed of the beast'; END IF;
                RETURN NEW;
            END $$;
            CREATE TRIGGER beast BEFORE INSERT ON positions FOR EACH ROW EXECUTE FUNCTION beast();
        """)
    fields = {"device_id": IMEI, "second": 1, **bad_fields}
    records = [rec(IMEI, 0), rec(**fields), rec(IMEI, 2)]
    results = make_writer(pg_url, copy_threshold=threshold).write(records)
    assert statuses(results) == ["inserted", "failed", "inserted"]
    assert results[1].transient is False and message in (results[1].error or "")
    assert count(pg_conn) == 2


# --- transient failures ------------------------------------------------------------------

@PATHS
def test_a_dropped_connection_fails_the_batch_transiently_then_is_replaced(
        pg_url: str, pg_conn: Any, make_writer: Any, metrics: Metrics, threshold: int) -> None:
    writer = make_writer(pg_url, copy_threshold=threshold, metrics=metrics)
    assert writer.write(batch(5)) == [INSERTED] * 5
    terminate_writer_backends(pg_conn)
    results = writer.write(batch(5, start=5))
    assert {(r.status, r.transient) for r in results} == {(WriteStatus.FAILED, True)}
    assert len(results) == 5 and "terminat" in (results[0].error or "")
    assert not writer.healthy and writer.last_error == results[0].error
    assert writer.write(batch(5, start=5)) == [INSERTED] * 5
    assert writer.healthy and writer.last_error is None
    assert count(pg_conn) == 10
    assert sample(metrics, "processor_postgres_errors_total") == 1
    assert sample(metrics, "processor_records_written_total", status="failed") == 0


@PATHS
def test_a_transient_failure_mid_split_fails_only_the_unsettled_records(
        pg_url: str, pg_conn: Any, make_writer: Any, threshold: int) -> None:
    with pg_conn.cursor() as cur:
        cur.execute("""
            ALTER TABLE positions ADD CONSTRAINT no_bad CHECK (device_id <> 'bad');
            CREATE FUNCTION kill() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN
                IF NEW.device_id = 'kill' THEN PERFORM pg_terminate_backend(pg_backend_pid()); END IF;
                RETURN NEW;
            END $$;
            CREATE TRIGGER kill BEFORE INSERT ON positions FOR EACH ROW EXECUTE FUNCTION kill();
        """)
    writer = make_writer(pg_url, copy_threshold=threshold)
    # The whole batch fails on row 1 (bad) before reaching row 3; the half [2, 3] loses the connection.
    results = writer.write([rec(IMEI, 0), rec("bad", 1), rec(IMEI, 2), rec("kill", 3)])
    assert statuses(results) == ["inserted", "failed", "failed/transient", "failed/transient"]
    assert writer.write([rec(IMEI, 2)]) == [INSERTED]
    assert count(pg_conn) == 2


def test_an_unreachable_server_fails_transiently_without_leaking_the_password(make_writer: Any) -> None:
    writer = make_writer(closed_port_dsn("s3cretpw"))
    results = writer.write(batch(3))
    assert [(r.status, r.transient) for r in results] == [(WriteStatus.FAILED, True)] * 3
    assert "s3cretpw" not in (results[0].error or "") and "127.0.0.1" in (results[0].error or "")
    assert not writer.healthy
    with pytest.raises(TransientError):
        writer.ping()


def test_ping_reports_health(pg_url: str, make_writer: Any) -> None:
    writer = make_writer(pg_url)
    assert not writer.healthy and writer.last_success == 0.0
    writer.ping()
    assert writer.healthy and writer.last_error is None
    before = time.time()
    writer.write(batch(1))
    assert before <= writer.last_success <= time.time()


# --- submit(): threads and retries -------------------------------------------------------

def test_submit_from_many_batches_on_several_threads(pg_url: str, pg_conn: Any, make_writer: Any,
                                                     metrics: Metrics) -> None:
    writer = make_writer(pg_url, threads=3, metrics=metrics, copy_threshold=20)
    writer.start()
    batches = [batch(size, start=1000 * i, device_id=f"dev{i % 5}") for i, size in enumerate([5, 50] * 10)]
    futures = [writer.submit(b) for b in batches]
    results = [f.result(timeout=30) for f in futures]
    assert results == [[INSERTED] * len(b) for b in batches]
    # The same records again, once the first are settled: jobs run in parallel, so a copy sent
    # while its original still waited for a thread (one opening its connection) could be first.
    futures = [writer.submit(batches[i]) for i in (0, 1, 2)]
    assert [f.result(timeout=30) for f in futures] == [[DUPLICATE] * 5, [DUPLICATE] * 50, [DUPLICATE] * 5]
    assert count(pg_conn) == 550
    assert sample(metrics, "processor_records_written_total", status="inserted") == 550
    assert sample(metrics, "processor_records_written_total", status="duplicate") == 60
    assert sample(metrics, "processor_batch_write_seconds_count") == 23
    assert writer.close(10) is True


def test_submit_retries_after_a_dropped_connection(pg_url: str, pg_conn: Any, make_writer: Any, metrics: Metrics,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    writer = make_writer(pg_url, threads=1, metrics=metrics)
    assert writer.submit(batch(2)).result(timeout=10) == [INSERTED] * 2  # the worker's connection exists
    terminate_writer_backends(pg_conn)
    with caplog.at_level(logging.WARNING, logger="processor.core.writer"):
        assert writer.submit(batch(3, start=2)).result(timeout=10) == [INSERTED] * 3
    assert count(pg_conn) == 5
    assert sample(metrics, "processor_postgres_errors_total") == 1
    [warning] = caplog.records
    assert warning.getMessage().startswith("PostgreSQL write failed (attempt 1), retrying 3 records in ")
    assert warning.exc_info is None


def test_submit_retries_a_lock_timeout_until_the_lock_is_released(pg_url: str, pg_conn: Any, make_writer: Any,
                                                                   metrics: Metrics) -> None:
    locker = psycopg2.connect(pg_url)
    try:
        with locker.cursor() as cur:
            cur.execute("LOCK TABLE positions IN ACCESS EXCLUSIVE MODE")
        writer = make_writer(pg_url + "?options=-c%20lock_timeout%3D50", threads=1, metrics=metrics)
        future = writer.submit(batch(30))
        wait_until(lambda: sample(metrics, "processor_postgres_errors_total") >= 2, timeout=20,
                   message="two failed attempts")
        assert not future.done()
    finally:
        locker.rollback()
        locker.close()
    assert future.result(timeout=20) == [INSERTED] * 30
    assert count(pg_conn) == 30 and writer.healthy


def test_only_transient_failures_are_retried(pg_url: str, pg_conn: Any, make_writer: Any) -> None:
    with pg_conn.cursor() as cur:
        cur.execute("ALTER TABLE positions ADD CONSTRAINT no_bad CHECK (device_id <> 'bad')")
    writer = make_writer(pg_url, threads=1)
    results = writer.submit([rec(IMEI, 0), rec("bad", 1), rec(IMEI, 0)]).result(timeout=10)
    assert statuses(results) == ["inserted", "failed", "duplicate"]


@pytest.mark.parametrize("interrupt", ["cancel_retries", "stop_event"])
def test_an_endless_retry_loop_can_be_interrupted(make_writer: Any, metrics: Metrics, interrupt: str) -> None:
    stop = threading.Event()
    writer = make_writer(closed_port_dsn(), threads=1, metrics=metrics, stop=stop, backoff_start=30.0,
                         backoff_max=30.0)
    future = writer.submit(batch(4))
    wait_until(lambda: sample(metrics, "processor_postgres_errors_total") >= 1, timeout=10,
               message="the first failed attempt")
    if interrupt == "cancel_retries":
        writer.cancel_retries()
    else:
        stop.set()
    results = future.result(timeout=5)  # far below the 30 s backoff: the wait was interrupted
    assert [(r.status, r.transient) for r in results] == [(WriteStatus.FAILED, True)] * 4
    assert sample(metrics, "processor_postgres_errors_total") == 1


def test_close_when_idle_returns_true_and_refuses_new_work(pg_url: str, make_writer: Any) -> None:
    writer = make_writer(pg_url, threads=2)
    assert writer.submit(batch(3)).result(timeout=10) == [INSERTED] * 3
    assert writer.close(5) is True
    with pytest.raises(RuntimeError):
        writer.submit(batch(1))


def test_close_gives_up_on_a_retrying_job_at_the_deadline(make_writer: Any) -> None:
    writer = make_writer(closed_port_dsn(), threads=1, backoff_start=30.0, backoff_max=30.0)
    running = writer.submit(batch(2))
    queued = writer.submit(batch(3, start=2))
    assert writer.close(0.5) is False
    for future, n in ((running, 2), (queued, 3)):
        results = future.result(timeout=1)
        assert [(r.status, r.transient) for r in results] == [(WriteStatus.FAILED, True)] * n


def test_a_worker_that_dies_is_replaced(pg_url: str, pg_conn: Any, make_writer: Any,
                                        caplog: pytest.LogCaptureFixture) -> None:
    writer = make_writer(pg_url, threads=1)
    poisoned = [rec(IMEI, 0), Record("9-0", position="not a Position")]  # type: ignore[arg-type]
    with caplog.at_level(logging.ERROR, logger="processor.core.writer"):
        future = writer.submit(poisoned)
        assert isinstance(future.exception(timeout=10), AttributeError)
    [error] = caplog.records
    assert error.getMessage() == "writer thread died on a batch of 2 records; starting a new one"
    assert error.exc_info is not None
    # threads=1: only a replacement thread can run these.
    assert writer.submit(batch(2)).result(timeout=10) == [INSERTED] * 2
    assert writer.submit(batch(2)).result(timeout=10) == [DUPLICATE] * 2
    assert count(pg_conn) == 2


# --- metrics and logs --------------------------------------------------------------------

@PATHS
def test_metrics_count_each_outcome_once(pg_url: str, pg_conn: Any, make_writer: Any, metrics: Metrics,
                                         threshold: int) -> None:
    with pg_conn.cursor() as cur:
        cur.execute("ALTER TABLE positions ADD CONSTRAINT no_bad CHECK (device_id <> 'bad')")
    writer = make_writer(pg_url, copy_threshold=threshold, metrics=metrics)
    before = time.time()
    writer.write(batch(10))
    writer.write(batch(3) + batch(2, start=10) + [rec("bad", 0)])
    assert sample(metrics, "processor_last_write_timestamp_seconds") >= before
    terminate_writer_backends(pg_conn)
    writer.write(batch(4, start=20))
    expected = {"inserted": 12, "duplicate": 3, "failed": 1}
    for status, value in expected.items():
        assert sample(metrics, "processor_records_written_total", status=status) == value
    assert sample(metrics, "processor_postgres_errors_total") == 2
    assert sample(metrics, "processor_batch_write_seconds_count") == 3


def test_debug_line_per_batch(pg_url: str, make_writer: Any, caplog: pytest.LogCaptureFixture) -> None:
    writer = make_writer(pg_url)
    writer.write(batch(2))
    with caplog.at_level(logging.DEBUG, logger="processor.core.writer"):
        writer.write(batch(3))
    assert [r.getMessage() for r in caplog.records] == ["batch written inserted=1 duplicates=2 failed=0"]


def test_a_slow_submit_is_still_pending_until_written(pg_url: str, make_writer: Any) -> None:
    """The future is not resolved early: it waits for the commit (here held back by a lock)."""
    locker = psycopg2.connect(pg_url)
    try:
        with locker.cursor() as cur:
            cur.execute("LOCK TABLE positions IN ACCESS EXCLUSIVE MODE")
        future = make_writer(pg_url, threads=1).submit(batch(1))
        with pytest.raises(FutureTimeout):
            future.result(timeout=0.5)
    finally:
        locker.rollback()
        locker.close()
    assert future.result(timeout=10) == [INSERTED]
