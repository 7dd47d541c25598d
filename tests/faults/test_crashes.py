"""The processor killed, restarted, started three at once, crashing on an unexpected error (issue 5: 1, 7, 9)."""

from __future__ import annotations

import signal
import time

import psycopg2
import pytest

from tests.faults.conftest import (Outcome, assert_nothing_lost, fleet_entries, log_entries, publish_entries,
                                   scrape, wait_or_explain, with_metrics)
from tests.helpers import BASE_MS, ServiceProcess, hold_write_lock, payload, pending_count, row_count, wait_until

LOAD = 50_000


def _all_stored(client, keys, pg_url, rows: int) -> bool:
    return row_count(pg_url) == rows and pending_count(client, keys["stream"], keys["group"]) == 0


def _consumers(client, keys) -> list[str]:
    return sorted(c["name"].decode() for c in client.xinfo_consumers(keys["stream"], keys["group"]))


@pytest.mark.slow
def test_kill_9_three_times_during_50k_loses_nothing(fault_env, redis_client, pg_url, keys):
    published = publish_entries(redis_client, keys["stream"], fleet_entries(LOAD))
    env = dict(fault_env, BATCH_SIZE="500")
    at_kill: list[tuple[int, int]] = []  # (rows, pending) right after each SIGKILL
    for fraction in (0.2, 0.5, 0.8):
        with ServiceProcess(env) as proc:
            wait_or_explain(proc, lambda f=fraction: row_count(pg_url) >= f * LOAD, 60, 0.01,
                            f"{fraction:.0%} of the rows")
            proc.proc.send_signal(signal.SIGKILL)
            assert proc.wait(10) == -signal.SIGKILL
        at_kill.append((row_count(pg_url), pending_count(redis_client, keys["stream"], keys["group"])))
    with ServiceProcess(env) as proc:
        wait_or_explain(proc, lambda: _all_stored(redis_client, keys, pg_url, LOAD), 120, 0.1, "all 50,000 rows")
        proc.signal(signal.SIGTERM)
        assert proc.wait(20) == 0
        # Rule 4: each restart first re-read what its previous life had read and not acknowledged.
        assert log_entries(proc, "own pending entries done")
    print(f"measured: (rows, pending) after each SIGKILL {at_kill}")  # for docs/reliability.md (pytest -rP)
    assert all(rows < LOAD for rows, _ in at_kill), at_kill
    assert any(pending for _, pending in at_kill), f"no kill caught entries in flight: {at_kill}"
    assert assert_nothing_lost(redis_client, pg_url, keys, published) == Outcome(LOAD, {}, {})


def test_ten_restarts_leave_the_consumers_of_the_group_unchanged(fault_env, redis_client, pg_url, keys):
    published = {}
    for i in range(10):
        published.update(publish_entries(redis_client, keys["stream"],
                                         [{b"payload": payload(f"restart-{i}", BASE_MS + n)} for n in range(20)]))
        with ServiceProcess(fault_env) as proc:
            wait_or_explain(proc, lambda: _all_stored(redis_client, keys, pg_url, len(published)), 30, 0.05, "rows")
            if i % 2:
                proc.proc.send_signal(signal.SIGKILL)  # half of them die without a goodbye
                assert proc.wait(10) == -signal.SIGKILL
            else:
                proc.signal(signal.SIGTERM)
                assert proc.wait(20) == 0
        assert _consumers(redis_client, keys) == [keys["consumer"]], f"after restart {i + 1}"
    assert assert_nothing_lost(redis_client, pg_url, keys, published) == Outcome(200, {}, {})


@pytest.mark.slow
def test_three_instances_share_a_50k_stream_exactly_once(fault_env, redis_client, pg_url, keys):
    procs, urls = [], []
    for n in range(3):
        env, url = with_metrics(dict(fault_env, CONSUMER_NAME=f"{keys['consumer']}-{n}", BATCH_SIZE="500"))
        procs.append(ServiceProcess(env).start())
        urls.append(url)
    try:
        for proc in procs:
            proc.wait_for_log("processor ready")
        published = publish_entries(redis_client, keys["stream"], fleet_entries(LOAD, seed=9))
        wait_until(lambda: _all_stored(redis_client, keys, pg_url, LOAD), 120, 0.1, "all 50,000 rows")
        inserted = [scrape(url, "processor_records_written_total", {"status": "inserted"}) or 0 for url in urls]
        duplicates = [scrape(url, "processor_records_written_total", {"status": "duplicate"}) or 0 for url in urls]
        for proc in procs:
            proc.signal(signal.SIGTERM)
        assert [proc.wait(20) for proc in procs] == [0, 0, 0]
    finally:
        for proc in procs:
            proc.__exit__(None, None, None)
    # Each entry was delivered to exactly one of them: no duplicate write anywhere, and all three worked.
    print(f"measured: inserted per instance {inserted}, duplicates {duplicates}")
    assert sum(inserted) == LOAD and sum(duplicates) == 0, (inserted, duplicates)
    assert all(inserted), inserted
    assert assert_nothing_lost(redis_client, pg_url, keys, published) == Outcome(LOAD, {}, {})


def test_three_instances_starting_at_once_on_a_fresh_database_migrate_once(fault_env, redis_client,
                                                                         empty_pg_url, keys):
    procs = [ServiceProcess(dict(fault_env, POSTGRES_URL=empty_pg_url, CONSUMER_NAME=f"{keys['consumer']}-{n}"))
             for n in range(3)]
    try:
        for proc in procs:
            proc.start()
        for proc in procs:
            proc.wait_for_log("processor ready")
        published = publish_entries(redis_client, keys["stream"],
                                    [{b"payload": payload(f"m{n}", BASE_MS)} for n in range(30)])
        wait_until(lambda: _all_stored(redis_client, keys, empty_pg_url, 30), 30, 0.05, "30 rows")
        for proc in procs:
            assert len(log_entries(proc, "migrations applied")) == 1
            proc.signal(signal.SIGTERM)
        assert [proc.wait(20) for proc in procs] == [0, 0, 0]
    finally:
        for proc in procs:
            proc.__exit__(None, None, None)
    conn = psycopg2.connect(empty_pg_url)
    with conn.cursor() as cur:
        cur.execute("SELECT count(*) FROM pg_class WHERE relname = 'positions' AND relkind IN ('r', 'p')")
        assert cur.fetchone()[0] == 1
    conn.close()
    assert assert_nothing_lost(redis_client, empty_pg_url, keys, published) == Outcome(30, {}, {})


def _turn_the_stream_into_a_string(client, key: str) -> None:
    """Atomically replace the stream by a string: the processor's next call on it gets WRONGTYPE."""
    pipe = client.pipeline(transaction=True)
    pipe.delete(key).set(key, "not a stream")
    pipe.execute()


def _writer_waiting_on_lock(pg_url: str) -> bool:
    conn = psycopg2.connect(pg_url)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT count(*) FROM pg_locks l JOIN pg_class c ON c.oid = l.relation "
                        "WHERE c.relname = 'positions' AND NOT l.granted")
            return cur.fetchone()[0] > 0
    finally:
        conn.close()


def test_an_unexpected_error_in_the_main_loop_exits_1_after_the_graceful_sequence(
        fault_env, redis_client, pg_url, pg_conn, keys):
    # The main loop must be busy elsewhere (not blocked on XREADGROUP) when the key changes type, or
    # Redis unblocks the read with another error: one batch, every row refused by a CHECK, written
    # behind a lock, with one batch in flight at most, holds the loop in its settle wait.
    with pg_conn.cursor() as cur:
        cur.execute("ALTER TABLE positions ADD CONSTRAINT no_doomed CHECK (device_id <> 'doomed')")
    env = dict(fault_env, BATCH_SIZE="10", MAX_INFLIGHT_BATCHES="1")
    blocker = hold_write_lock(pg_url)
    with ServiceProcess(env) as proc:
        proc.wait_for_log("processor ready")
        publish_entries(redis_client, keys["stream"], [{b"payload": payload("doomed", BASE_MS + n)} for n in range(10)])
        wait_or_explain(proc, lambda: _writer_waiting_on_lock(pg_url), 30, 0.05, "the write waiting on the lock")
        _turn_the_stream_into_a_string(redis_client, keys["stream"])
        blocker.rollback()
        assert proc.wait(30) == 1
        logs = proc.logs()
    blocker.close()
    messages = [e.get("msg", "") for e in logs]
    [crash] = [e for e in logs if e.get("msg") == "unexpected error in the main loop; stopping"]
    assert crash["level"] == "error" and "WRONGTYPE" in crash["exc"], crash
    assert messages.index(crash["msg"]) < messages.index("processor stopped")
    assert [e for e in logs if e.get("msg") == "processor stopped"][0]["clean"] is True
    assert row_count(pg_url) == 0
    redis_client.delete(keys["stream"])


def test_the_stream_deleted_while_the_processor_waits_on_it_is_recreated(fault_env, redis_client, pg_url, keys):
    with ServiceProcess(fault_env) as proc:
        proc.wait_for_log("processor ready")
        time.sleep(0.5)  # idle: the main loop spends its time blocked in XREADGROUP
        redis_client.delete(keys["stream"])
        time.sleep(1.0)
        assert proc.proc.poll() is None, "the processor exited:\n" + proc.output
        published = publish_entries(redis_client, keys["stream"],
                                    [{b"payload": payload("after-del", BASE_MS + n)} for n in range(10)])
        wait_or_explain(proc, lambda: _all_stored(redis_client, keys, pg_url, 10), 30, 0.05, "10 rows")
    assert assert_nothing_lost(redis_client, pg_url, keys, published) == Outcome(10, {}, {})


def test_a_non_transient_error_on_xack_still_runs_the_graceful_sequence(fault_env, redis_client, pg_url, keys):
    # As above, but the rows are fine: the first Redis call after the write is the XACK, on a string key.
    env = dict(fault_env, BATCH_SIZE="10", MAX_INFLIGHT_BATCHES="1")
    blocker = hold_write_lock(pg_url)
    with ServiceProcess(env) as proc:
        proc.wait_for_log("processor ready")
        pipe = redis_client.pipeline(transaction=True)  # all ten in the one read that wakes up
        for n in range(10):
            pipe.xadd(keys["stream"], {"payload": payload("fine", BASE_MS + n)})
        pipe.execute()
        wait_or_explain(proc, lambda: _writer_waiting_on_lock(pg_url), 30, 0.05, "the write waiting on the lock")
        _turn_the_stream_into_a_string(redis_client, keys["stream"])
        blocker.rollback()
        assert proc.wait(30) == 1
        logs = proc.logs()
    blocker.close()
    redis_client.delete(keys["stream"])
    [crash] = [e for e in logs if e.get("msg") == "unexpected error in the main loop; stopping"]
    assert "XACK: WRONGTYPE" in crash["exc"]
    assert row_count(pg_url) == 10
    assert [e.get("msg") for e in logs][-1] == "processor stopped"
