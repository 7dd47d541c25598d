"""PostgreSQL up but refusing, stalling or changing under the service (issue 11: 1 to 5; CONTRACT 4
rules 13 to 15).

Each scenario asserts the suite's invariant plus what the issue asks: no good entry dead-lettered,
delivery counts unchanged by waiting (they grow only when an attempt ended: a restart, a row
refusal), and every row written once the fault ends.
"""

from __future__ import annotations

import signal
import time
import uuid
from collections.abc import Mapping

import psycopg2
import redis

from tests.faults.conftest import (assert_nothing_lost, fleet_entries, log_entries, publish_entries, scrape,
                                   stored_keys, wait_or_explain, with_metrics)
from tests.helpers import (BASE_MS, ServiceProcess, admin, hold_write_lock, http_get, payload, pending_count,
                           row_count, scalar)

# Reclaim every 0.2 s: before the fixes, each pass raised the delivery count of the waiting entries.
QUICK = {"RECLAIM_IDLE_MS": "300", "SHUTDOWN_TIMEOUT_S": "2"}


def deliveries(client, keys: Mapping[str, str]) -> dict[str, int]:
    """Entry id -> delivery count, for every entry pending in the group."""
    try:
        rows = client.xpending_range(keys["stream"], keys["group"], "-", "+", 100_000)
    except redis.ResponseError:  # NOGROUP: the service has not created the group yet
        return {}
    return {r["message_id"].decode(): int(r["times_delivered"]) for r in rows}


def settled(client, keys, pg_url: str, rows: int) -> bool:
    return row_count(pg_url) == rows and pending_count(client, keys["stream"], keys["group"]) == 0


def stop(proc: ServiceProcess) -> int:
    proc.signal(signal.SIGTERM)
    return proc.wait(20)


def readyz(metrics: str) -> tuple[int, str]:
    return http_get(metrics + "/readyz")


# --- 1. writes wait on a lock longer than RECLAIM_IDLE_MS, then a restart -----------------------

def test_writes_waiting_on_a_lock_then_a_restart_dead_letter_nothing(fault_env, redis_client, pg_url, keys):
    published = publish_entries(redis_client, keys["stream"], fleet_entries(10, devices=5, seed=11))
    blocker = hold_write_lock(pg_url)
    env, metrics = with_metrics(dict(fault_env, **QUICK))
    try:
        with ServiceProcess(env) as proc:
            wait_or_explain(proc, lambda: len(deliveries(redis_client, keys)) == 10, 20, 0.05, "10 in flight")
            time.sleep(3.0)  # ten RECLAIM_IDLE_MS with the write waiting on the lock
            while_waiting = deliveries(redis_client, keys)
            status, why = readyz(metrics)
            reclaimed = scrape(metrics, "processor_reclaimed_total")
            assert stop(proc) == 1  # the write outlasted SHUTDOWN_TIMEOUT_S: still pending
            paused = log_entries(proc, "reclaim paused: PostgreSQL is not writable", "warning")
        with ServiceProcess(env) as proc:  # the restart, while the lock is still held
            wait_or_explain(proc, lambda: set(deliveries(redis_client, keys).values()) == {2}, 20, 0.05,
                            "the restart's own-pending read")
            time.sleep(1.5)
            after_restart = deliveries(redis_client, keys)
            blocker.rollback()
            wait_or_explain(proc, lambda: settled(redis_client, keys, pg_url, 10), 30, 0.05, "10 rows")
            assert stop(proc) == 0
    finally:
        blocker.close()
    print(f"measured: deliveries while waiting {sorted(set(while_waiting.values()))}, after the restart "
          f"{sorted(set(after_restart.values()))}; readyz {status} {why.strip()!r}; reclaimed {reclaimed:.0f}")
    assert set(while_waiting.values()) == {1}  # waiting counted nothing
    assert set(after_restart.values()) == {2}  # the restart is one ended attempt, no more
    assert reclaimed == 0 and paused
    assert status == 503 and ("a write has been waiting" in why or "locked by another session" in why), why
    outcome = assert_nothing_lost(redis_client, pg_url, keys, published)
    assert (outcome.rows, outcome.dead_letters) == (10, {})


# --- 2. INSERT privilege revoked for a few seconds ----------------------------------------------

def test_insert_privilege_revoked_then_granted_again_dead_letters_nothing(
        fault_env, redis_client, throwaway_postgres, keys):
    pg = throwaway_postgres
    role = f"writer_{uuid.uuid4().hex[:8]}"
    admin(pg.url, f"CREATE ROLE {role} LOGIN", f"GRANT USAGE ON SCHEMA public TO {role}",
          f"GRANT SELECT, INSERT ON positions TO {role}")
    writer_url = pg.url.replace("postgres@", f"{role}@", 1)
    env, metrics = with_metrics(dict(fault_env, POSTGRES_URL=writer_url, MIGRATE_ON_START="false", **QUICK))
    published = publish_entries(redis_client, keys["stream"], fleet_entries(4, devices=4, seed=12))
    with ServiceProcess(env) as proc:
        wait_or_explain(proc, lambda: settled(redis_client, keys, pg.url, 4), 20, 0.05, "4 rows")
        admin(pg.url, f"REVOKE INSERT ON positions FROM {role}")
        published.update(publish_entries(redis_client, keys["stream"], fleet_entries(6, devices=6, seed=13),
                                         atomic=True))
        wait_or_explain(proc, lambda: len(deliveries(redis_client, keys)) == 6, 20, 0.05, "6 in flight")
        time.sleep(3.0)
        while_revoked = deliveries(redis_client, keys)
        status, why = readyz(metrics)
        assert stop(proc) == 1
    with ServiceProcess(env) as proc:
        wait_or_explain(proc, lambda: set(deliveries(redis_client, keys).values()) == {2}, 20, 0.05, "the restart")
        admin(pg.url, f"GRANT INSERT ON positions TO {role}")
        wait_or_explain(proc, lambda: settled(redis_client, keys, pg.url, 10), 60, 0.05, "all 10 rows")
        assert stop(proc) == 0
    print(f"measured: deliveries while revoked {sorted(set(while_revoked.values()))}; readyz {status} {why.strip()!r}")
    assert set(while_revoked.values()) == {1}
    assert status == 503 and "permission denied" in why
    outcome = assert_nothing_lost(redis_client, pg.url, keys, published)
    assert (outcome.rows, outcome.dead_letters) == (10, {})


# --- 3. the server turns read-only while running; a demoted primary -----------------------------

def _read_only(url: str, on: bool) -> None:
    admin(url, f"ALTER SYSTEM SET default_transaction_read_only = {'on' if on else 'off'}", "SELECT pg_reload_conf()")


def test_a_server_turning_read_only_holds_the_batch_instead_of_dead_lettering_it(
        fault_env, redis_client, throwaway_postgres, keys):
    pg = throwaway_postgres
    env, metrics = with_metrics(dict(fault_env, POSTGRES_URL=pg.url, **QUICK))
    with ServiceProcess(env) as proc:
        proc.wait_for_log("processor ready")
        _read_only(pg.url, True)
        time.sleep(0.3)
        published = publish_entries(redis_client, keys["stream"], fleet_entries(20, devices=10, seed=14), atomic=True)
        wait_or_explain(proc, lambda: len(deliveries(redis_client, keys)) == 20, 20, 0.05, "20 in flight")
        time.sleep(2.0)
        while_read_only = deliveries(redis_client, keys)
        status, why = readyz(metrics)
        rejected = scrape(metrics, "processor_records_written_total", {"status": "failed"})
        _read_only(pg.url, False)
        wait_or_explain(proc, lambda: settled(redis_client, keys, pg.url, 20), 60, 0.05, "20 rows")
        assert stop(proc) == 0
        split = log_entries(proc, "row rejected by PostgreSQL")
    print(f"measured: readyz {status} {why.strip()!r} while read-only; "
          f"deliveries {sorted(set(while_read_only.values()))}")
    assert set(while_read_only.values()) == {1}
    assert status == 503 and "read-only transaction" in why
    assert rejected == 0 and split == []  # never split row by row, never blamed on a row
    outcome = assert_nothing_lost(redis_client, pg.url, keys, published)
    assert (outcome.rows, outcome.dead_letters) == (20, {})


def test_a_demoted_primary_leads_to_a_reconnect_to_the_new_one(fault_env, redis_client, throwaway_postgres_factory,
                                                               keys):
    """A multi-host POSTGRES_URL with target_session_attrs=read-write: when the primary turns
    read-only (demoted) and the other server becomes writable, the writer reconnects and finds it."""
    first, second = throwaway_postgres_factory(), throwaway_postgres_factory()
    _read_only(second.url, True)  # the standby
    url = (f"postgresql://postgres@127.0.0.1:{first.port},127.0.0.1:{second.port}/postgres"
           "?target_session_attrs=read-write")
    env = dict(fault_env, POSTGRES_URL=url, **QUICK)
    entries = fleet_entries(200, devices=20, seed=15)
    with ServiceProcess(env) as proc:
        proc.wait_for_log("processor ready")
        published = publish_entries(redis_client, keys["stream"], entries[:100])
        wait_or_explain(proc, lambda: settled(redis_client, keys, first.url, 100), 30, 0.05, "100 rows on the first")
        _read_only(first.url, True)  # demoted
        _read_only(second.url, False)  # promoted
        published.update(publish_entries(redis_client, keys["stream"], entries[100:]))
        wait_or_explain(proc, lambda: row_count(second.url) == 100
                        and pending_count(redis_client, keys["stream"], keys["group"]) == 0, 60, 0.05,
                        "the next 100 on the new primary")
        assert stop(proc) == 0
        refused = log_entries(proc, "read-only transaction", "warning")
    print(f"measured: {row_count(first.url)} rows on the old primary, {row_count(second.url)} on the new one; "
          f"{len(refused)} refused attempts before the reconnect")
    assert refused  # the demotion was seen as a systemic error, then the writer reconnected
    assert row_count(first.url) == 100 and row_count(second.url) == 100
    assert stored_keys(first.url) | stored_keys(second.url) == {k for k in _keys(published)}
    assert redis_client.xlen(keys["dead"]) == 0


def _keys(published):
    from tests.faults.conftest import DECODER

    return {(p.device_id, p.ts) for p in (DECODER.decode(f) for f in published.values())}


# --- 4. one row refused with an error class the writer does not know -----------------------------

UNKNOWN_TRIGGER = """
CREATE FUNCTION refuse_unknown() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.speed = 123 OR (SELECT every_row FROM refuse_all) THEN
        PERFORM nextval('refused_statements');  -- survives the rollback: one per refused statement
        RAISE EXCEPTION 'ON CONFLICT into a compressed chunk is not supported' USING ERRCODE = 'feature_not_supported';
    END IF;
    RETURN NEW;
END $$;
CREATE SEQUENCE refused_statements;
CREATE TABLE refuse_all (every_row boolean NOT NULL);
INSERT INTO refuse_all VALUES (false);
CREATE TRIGGER refuse_unknown BEFORE INSERT ON positions FOR EACH ROW EXECUTE FUNCTION refuse_unknown();
"""


def test_one_row_refused_with_an_unknown_error_class_is_isolated_and_its_neighbours_written(
        fault_env, redis_client, pg_url, keys):
    admin(pg_url, UNKNOWN_TRIGGER)
    entries = fleet_entries(29, devices=10, seed=16)
    entries.insert(17, {b"payload": payload("356307042441099", BASE_MS, speed=123.0)})
    env = dict(fault_env, **QUICK, MAX_DELIVERIES="3")
    with ServiceProcess(env) as proc:
        published = publish_entries(redis_client, keys["stream"], entries)
        bad = list(published)[17]
        wait_or_explain(proc, lambda: redis_client.xlen(keys["dead"]) == 1 and settled(redis_client, keys, pg_url, 29),
                        30, 0.05, "29 rows and one dead letter")
        assert stop(proc) == 0
        refusals = log_entries(proc, f"row refused by PostgreSQL while its neighbours were written, entry {bad}")
    outcome = assert_nothing_lost(redis_client, pg_url, keys, published, letters={bad: "db_rejected"})
    assert outcome.rows == 29 and outcome.dead_letters == {"db_rejected": 1} and outcome.deliveries == {bad: 3}
    assert len(refusals) == 3  # refused alone on each of its MAX_DELIVERIES deliveries
    [letter] = [f for _, f in redis_client.xrange(keys["dead"])]
    assert b"compressed chunk" in letter[b"detail"] and b"0A000" in letter[b"detail"]


def test_an_unknown_error_on_every_row_is_systemic_and_costs_a_few_statements(
        fault_env, redis_client, pg_url, keys):
    admin(pg_url, UNKNOWN_TRIGGER, "UPDATE refuse_all SET every_row = true")
    env, metrics = with_metrics(dict(fault_env, **QUICK))
    with ServiceProcess(env) as proc:
        proc.wait_for_log("processor ready")
        published = publish_entries(redis_client, keys["stream"], fleet_entries(1000, devices=50, seed=17),
                                    atomic=True)
        wait_or_explain(proc, lambda: len(deliveries(redis_client, keys)) == 1000, 20, 0.05, "1000 in flight")
        time.sleep(2.0)
        status, why = readyz(metrics)
        counts = set(deliveries(redis_client, keys).values())
        admin(pg_url, "UPDATE refuse_all SET every_row = false")
        wait_or_explain(proc, lambda: settled(redis_client, keys, pg_url, 1000), 60, 0.05, "1000 rows")
        # Read once everything is written: no attempt is under way, each failed one is counted (the
        # counter also holds the monitor's failed probes, which refuse no row).
        attempts = scrape(metrics, "processor_postgres_errors_total")
        assert stop(proc) == 0
    statements = scalar(pg_url, "SELECT CASE WHEN is_called THEN last_value ELSE 0 END FROM refused_statements")
    print(f"measured: {statements} refused statements in {attempts:.0f} failed attempts "
          f"({statements / max(attempts, 1):.1f} each; a full split would be 1,999); readyz {status}")
    assert counts == {1} and status == 503 and "0A000" in why
    # per attempt: the direct COPY, then the split's failed statements up to its budget (2 x 10 + 2) and the one
    # that exceeds it; plus one attempt: the one under way when the refusals stopped ends written, uncounted
    assert attempts >= 1 and statements <= (attempts + 1) * (2 * (1000).bit_length() + 4)
    outcome = assert_nothing_lost(redis_client, pg_url, keys, published)
    assert (outcome.rows, outcome.dead_letters) == (1000, {})


# --- 5. rows over a size limit (54000) ------------------------------------------------------------

def test_rows_over_a_size_limit_are_isolated_and_their_neighbours_written(fault_env, redis_client, pg_url, keys):
    # An index someone added downstream: a 9 KB value does not fit in a btree entry (54000).
    admin(pg_url, "CREATE INDEX blob_idx ON positions ((attributes->>'blob'))")
    import os

    entries = fleet_entries(20, devices=10, seed=18)
    big = [{b"payload": payload(f"35630704244110{i}", BASE_MS + i, attributes={"blob": os.urandom(4608).hex()})}
           for i in range(3)]
    for index, entry in zip((3, 11, 19), big):
        entries.insert(index, entry)
    env = dict(fault_env, **QUICK, MAX_DELIVERIES="2")
    with ServiceProcess(env) as proc:
        published = publish_entries(redis_client, keys["stream"], entries)
        bad = [list(published)[i] for i in (3, 11, 19)]
        wait_or_explain(proc, lambda: redis_client.xlen(keys["dead"]) == 3 and settled(redis_client, keys, pg_url, 20),
                        30, 0.05, "20 rows and 3 dead letters")
        assert stop(proc) == 0
    outcome = assert_nothing_lost(redis_client, pg_url, keys, published, letters={b: "db_rejected" for b in bad})
    assert outcome.rows == 20 and outcome.dead_letters == {"db_rejected": 3}
    assert set(outcome.deliveries.values()) == {2}
    details = [f[b"detail"] for _, f in redis_client.xrange(keys["dead"])]
    assert all(b"54000" in d and b"index row" in d for d in details), details


# --- two instances while one instance's writes wait --------------------------------------------

def test_a_peer_does_not_claim_entries_whose_write_waits_in_another_instance(
        fault_env, redis_client, pg_url, keys):
    """Instance A's batch waits on a row lock (another session inserted the same key and has not
    committed) for 3 x RECLAIM_IDLE_MS while instance B runs beside it: B claims nothing of A's."""
    idle_ms = 1000
    entries = fleet_entries(10, devices=5, seed=19)
    held = psycopg2.connect(pg_url)  # inserts the first entry's key and sits on it
    from tests.faults.conftest import DECODER

    first = DECODER.decode(entries[0])
    with held.cursor() as cur:
        cur.execute("INSERT INTO positions (device_id, ts, latitude, longitude) VALUES (%s, %s, 0, 0)",
                    (first.device_id, first.ts))
    env_a, metrics_a = with_metrics(dict(fault_env, RECLAIM_IDLE_MS=str(idle_ms), CONSUMER_NAME="instance-a",
                                         BATCH_SIZE="100"))
    env_b, metrics_b = with_metrics(dict(fault_env, RECLAIM_IDLE_MS=str(idle_ms), CONSUMER_NAME="instance-b"))
    try:
        with ServiceProcess(env_a) as a:
            a.wait_for_log("processor ready")
            pipe = redis_client.pipeline(transaction=True)  # atomically: A reads the ten as one batch
            for fields in entries:
                pipe.xadd(keys["stream"], fields)
            published = {i.decode(): f for i, f in zip(pipe.execute(), entries)}
            wait_or_explain(a, lambda: len(deliveries(redis_client, keys)) == 10, 20, 0.05, "A's batch in flight")
            with ServiceProcess(env_b) as b:
                b.wait_for_log("processor ready")
                more = publish_entries(redis_client, keys["stream"], fleet_entries(200, devices=20, seed=20))
                published.update(more)
                time.sleep(3 * idle_ms / 1000)
                waiting = deliveries(redis_client, keys)
                b_reclaimed = scrape(metrics_b, "processor_reclaimed_total")
                held.rollback()  # the key is free: A's batch goes through
                wait_or_explain(a, lambda: settled(redis_client, keys, pg_url, 210), 30, 0.05, "210 rows")
                b_reclaimed_end = scrape(metrics_b, "processor_reclaimed_total")
                assert stop(b) == 0
            assert stop(a) == 0
        owners = {c["name"].decode(): int(c["pending"])
                  for c in redis_client.xinfo_consumers(keys["stream"], keys["group"])}
    finally:
        held.close()
    a_ids = set(list(published)[:10])
    print(f"measured: A's 10 entries waited {3 * idle_ms} ms; deliveries meanwhile "
          f"{sorted(set(waiting[i] for i in a_ids))}; B reclaimed {b_reclaimed_end:.0f}")
    assert a_ids <= set(waiting) and {waiting[i] for i in a_ids} == {1}
    assert b_reclaimed == 0 and b_reclaimed_end == 0
    assert owners == {"instance-a": 0, "instance-b": 0}
    outcome = assert_nothing_lost(redis_client, pg_url, keys, published)
    assert (outcome.rows, outcome.dead_letters) == (210, {})
