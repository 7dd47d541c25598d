"""Redis up but refusing writes, and the tools run beside a live service (issue 11: 6, 9, 10, 11).

Redis at ``maxmemory`` answers OOM to XADD and XGROUP CREATE (reads, acknowledgements and claims
still work); a replica after a failover answers READONLY to everything that writes, XREADGROUP
included. Either way the service backs off, stays alive and not ready, and keeps the entries
pending: no crash loop, nothing lost, nothing dead-lettered for the wrong reason.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest
import redis

from processor.core.consumer import StreamConsumer, redis_client as make_client
from tests.faults.conftest import (assert_nothing_lost, fleet_entries, log_entries, publish_entries,
                                   read_as_dead_consumer, scrape, wait_or_explain, with_metrics)
from tests.helpers import ROOT, ServiceProcess, free_port, http_get, pending_count, row_count, wait_until

FILLER = "filler"

# Redis refusing, replay's gate and redrive: what is tried here does not depend on the kind of table
# (the hypertable's own writes are covered by test_refusals.py on both backends).
pytestmark = pytest.mark.backends("plain")


def _oom(client: redis.Redis) -> None:
    """Push Redis past maxmemory (noeviction): XADD and XGROUP CREATE now answer OOM.

    The filler goes in as small values: one big SET would leave an equally big query buffer
    behind for a moment, and the limit set from that reading would be cleared when it is freed.
    """
    pipe = client.pipeline(transaction=False)
    for n in range(100):
        pipe.set(f"{FILLER}:{n}", b"x" * 50_000)
    pipe.execute()
    used = int(client.info("memory")["used_memory"])
    client.config_set("maxmemory-policy", "noeviction")
    client.config_set("maxmemory", str(used - 2_000_000))
    assert _refuses_writes(client)


def _refuses_writes(client: redis.Redis) -> bool:
    try:
        client.xadd("probe:oom", {"a": "b"})
    except redis.OutOfMemoryError:
        return True
    client.delete("probe:oom")
    return False


def _relieve(client: redis.Redis) -> None:
    client.config_set("maxmemory", "0")
    client.delete(*[f"{FILLER}:{n}" for n in range(100)])


def _settled(client, keys, pg_url: str, rows: int) -> bool:
    return row_count(pg_url) == rows and pending_count(client, keys["stream"], keys["group"]) == 0


def _deliveries(client, keys) -> dict[str, int]:
    rows = client.xpending_range(keys["stream"], keys["group"], "-", "+", 100_000)
    return {r["message_id"].decode(): int(r["times_delivered"]) for r in rows}


# --- 10. Redis at maxmemory -----------------------------------------------------------------------

def test_dead_letters_refused_by_a_full_redis_are_held_and_the_valid_entries_written(
        fault_env, pg_url, keys, throwaway_redis):
    client = throwaway_redis.client()
    client.xgroup_create(keys["stream"], keys["group"], id="0", mkstream=True)
    entries = fleet_entries(18, devices=6, seed=21)
    entries[4:4] = [{b"payload": b"{not json"}, {b"payload": b'{"device_id": "x"}'}]
    published = publish_entries(client, keys["stream"], entries)
    bad = [list(published)[4], list(published)[5]]
    _oom(client)
    env, metrics = with_metrics(dict(fault_env, REDIS_URL=throwaway_redis.url, RECLAIM_IDLE_MS="300"))
    with ServiceProcess(env) as proc:
        wait_or_explain(proc, lambda: row_count(pg_url) == 18, 30, 0.05, "the 18 valid rows")
        time.sleep(2.0)  # several retries of the refused dead letters, and reclaim passes
        status, why = http_get(metrics + "/readyz")
        held = _deliveries(client, keys)
        alive = proc.proc.poll() is None
        _relieve(client)
        wait_or_explain(proc, lambda: client.xlen(keys["dead"]) == 2 and _settled(client, keys, pg_url, 18), 30,
                        0.05, "the two dead letters stored")
        proc.signal(signal.SIGTERM)
        assert proc.wait(20) == 0
        refused = log_entries(proc, "could not dead-letter 2 entries, holding them", "warning")
    print(f"measured: while Redis was full: readyz {status} {why.strip()!r}; held {held}")
    assert alive and status == 503 and "dead letters: 2 cannot be stored" in why and "maxmemory" in why
    assert held == {bad[0]: 1, bad[1]: 1}  # only the two, pending, never claimed back meanwhile
    assert refused
    outcome = assert_nothing_lost(client, pg_url, keys, published)
    assert outcome.rows == 18 and outcome.dead_letters == {"invalid_json": 1, "missing_field": 1}
    assert outcome.deliveries == {bad[0]: 1, bad[1]: 1}
    client.close()


def test_a_full_redis_at_start_up_is_waited_for_not_a_crash_loop(fault_env, pg_url, keys, throwaway_redis):
    client = throwaway_redis.client()
    published = publish_entries(client, keys["stream"], fleet_entries(50, devices=5, seed=22))
    _oom(client)  # XGROUP CREATE answers OOM
    env, metrics = with_metrics(dict(fault_env, REDIS_URL=throwaway_redis.url))
    with ServiceProcess(env) as proc:
        wait_or_explain(proc, lambda: len(log_entries(proc, "create the consumer group failed")) >= 3, 30, 0.05,
                        "three refused attempts")
        status, why = http_get(metrics + "/readyz")
        errors = scrape(metrics, "processor_redis_errors_total")
        _relieve(client)
        wait_or_explain(proc, lambda: _settled(client, keys, pg_url, 50), 30, 0.05, "50 rows")
        proc.signal(signal.SIGTERM)
        assert proc.wait(20) == 0
        starts = log_entries(proc, "processor starting")
    print(f"measured: readyz {status} {why.strip()!r} while full at start-up; redis errors counted {errors:.0f}")
    assert status == 503 and "maxmemory" in why and errors >= 3
    assert len(starts) == 1  # one process throughout
    assert assert_nothing_lost(client, pg_url, keys, published).rows == 50
    client.close()


def test_a_redis_turned_replica_after_a_failover_is_waited_for(fault_env, pg_url, keys, throwaway_redis):
    client = throwaway_redis.client()
    entries = fleet_entries(200, devices=10, seed=23)
    env, metrics = with_metrics(dict(fault_env, REDIS_URL=throwaway_redis.url))
    with ServiceProcess(env) as proc:
        proc.wait_for_log("processor ready")
        published = publish_entries(client, keys["stream"], entries[:100])
        wait_or_explain(proc, lambda: _settled(client, keys, pg_url, 100), 30, 0.05, "100 rows")
        # A replica of a primary that is not there: it keeps its data and answers READONLY to writes.
        client.execute_command("REPLICAOF", "127.0.0.1", str(free_port()))
        wait_or_explain(proc, lambda: log_entries(proc, "read only replica", "warning"), 15, 0.05, "a READONLY refusal")
        status, why = http_get(metrics + "/readyz")
        client.execute_command("REPLICAOF", "NO", "ONE")  # promoted again
        published.update(publish_entries(client, keys["stream"], entries[100:]))
        wait_or_explain(proc, lambda: _settled(client, keys, pg_url, 200), 60, 0.05, "200 rows")
        proc.signal(signal.SIGTERM)
        assert proc.wait(20) == 0
    print(f"measured: readyz {status} {why.strip()!r} while a replica")
    assert status == 503 and "read only replica" in why
    assert assert_nothing_lost(client, pg_url, keys, published).rows == 200
    client.close()


# --- 6. replay during a PostgreSQL outage -----------------------------------------------------------

def _replay(env: dict[str, str], *args: str) -> tuple[int, str, str]:
    done = subprocess.run([sys.executable, str(ROOT / "processor.py"), "replay", *args], cwd=str(ROOT), env=env,
                          capture_output=True, text=True, timeout=120)
    return done.returncode, done.stdout, done.stderr


def test_replay_runs_during_an_outage_change_nothing(fault_env, redis_client, throwaway_postgres, keys):
    pg = throwaway_postgres
    published = publish_entries(redis_client, keys["stream"], fleet_entries(300, devices=30, seed=24))
    read_as_dead_consumer(redis_client, keys["stream"], keys["group"], 300)
    env = dict(fault_env, POSTGRES_URL=pg.url, MAX_DELIVERIES="3", SHUTDOWN_TIMEOUT_S="2")
    pg.stop()
    before = _deliveries(redis_client, keys)
    runs = [_replay(env, "--min-idle-ms", "0") for _ in range(4)]  # more runs than MAX_DELIVERIES
    during = _deliveries(redis_client, keys)
    pg.start()
    code, out, err = _replay(env, "--min-idle-ms", "0")
    print(f"measured: outage runs exit {[r[0] for r in runs]}, {runs[0][2].strip()!r}; after: {out.strip()!r}")
    assert all(r[0] == 1 and r[1] == "" and len(r[2].strip().splitlines()) == 1 for r in runs), runs
    assert all("PostgreSQL is not writable, nothing claimed" in r[2] for r in runs)
    assert during == before and set(before.values()) == {1}
    assert (code, out) == (0, "claimed=300 inserted=300 duplicate=0 dead_lettered=0 failed=0 lost=0\n"), err
    outcome = assert_nothing_lost(redis_client, pg.url, keys, published)
    assert (outcome.rows, outcome.dead_letters) == (300, {})


def test_replay_while_positions_is_locked_claims_nothing(fault_env, redis_client, pg_url, keys):
    from tests.helpers import hold_write_lock

    read = publish_entries(redis_client, keys["stream"], fleet_entries(20, devices=5, seed=25))
    read_as_dead_consumer(redis_client, keys["stream"], keys["group"], 20)
    blocker = hold_write_lock(pg_url)
    try:
        code, out, err = _replay(fault_env, "--min-idle-ms", "0")
        during = _deliveries(redis_client, keys)
    finally:
        blocker.rollback()
        blocker.close()
    assert code == 1 and out == "" and "positions is locked by another session" in err, err
    assert set(during.values()) == {1}
    assert _replay(fault_env, "--min-idle-ms", "0")[0] == 0
    assert assert_nothing_lost(redis_client, pg_url, keys, read).rows == 20


# --- 9. exact delivery counts after XAUTOCLAIM -----------------------------------------------------------

def test_delivery_counts_after_a_claim_are_exact_among_our_other_pending_entries(redis_url, redis_client, keys):
    """The consumer holds 1,000 pending entries of its own inside the claimed range: the counts of the
    claimed ones must still be read exactly (a bounded XPENDING window once gave them as 1)."""
    published = publish_entries(redis_client, keys["stream"], [{b"payload": b"{}"}] * 1010)
    ids = list(published)
    read_as_dead_consumer(redis_client, keys["stream"], keys["group"], 1010)
    idle = ids[::101]  # ten, spread over the range, left idle on the dead consumer
    ours = [i for i in ids if i not in set(idle)]
    time.sleep(0.3)
    redis_client.xclaim(keys["stream"], keys["group"], keys["consumer"], 0, ours, justid=True)
    redis_client.xclaim(keys["stream"], keys["group"], "dead-consumer", 0, idle, idle=60_000, retrycount=9,
                        justid=True)
    client = make_client(redis_url, block_ms=200)
    consumer = StreamConsumer(client=client, stream=keys["stream"], group=keys["group"], consumer=keys["consumer"],
                              batch_size=1000)
    try:
        _, claimed, _ = consumer.claim(30_000)
    finally:
        client.close()
    assert {e.entry_id: e.deliveries for e in claimed} == {i: 10 for i in idle}


# --- 11. dead-letters redrive beside a running service ---------------------------------------------

def test_redrive_beside_a_running_service_moves_each_letter_once(fault_env, redis_client, pg_url, keys):
    env = dict(fault_env)
    bad = [{b"payload": b'{"device_id": "%d"}' % n} for n in range(2000)]  # still invalid after redrive
    with ServiceProcess(env) as proc:
        proc.wait_for_log("processor ready")
        publish_entries(redis_client, keys["stream"], bad)
        wait_until(lambda: redis_client.xlen(keys["dead"]) == 2000, 30, 0.05, "2,000 dead letters")
        done = subprocess.run([sys.executable, str(ROOT / "processor.py"), "dead-letters", "redrive"],
                              cwd=str(ROOT), env=env, capture_output=True, text=True, timeout=120)
        wait_until(lambda: redis_client.xlen(keys["dead"]) == 2000
                   and pending_count(redis_client, keys["stream"], keys["group"]) == 0, 30, 0.05,
                   "the 2,000 dead-lettered again")
        proc.signal(signal.SIGTERM)
        assert proc.wait(20) == 0
    print(f"measured: {done.stdout.strip()!r}")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("redrive: moved 2000 dead letters"), done.stdout
    assert "(scanned 2000)" in done.stdout
    assert redis_client.xlen(keys["stream"]) == 4000  # each letter went back once
