"""Entries left behind: poison, a dead consumer's, trimmed ones, and replay paging through them
(issue 5: 4, 5, 6, 8)."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time

from tests.faults.conftest import (Outcome, assert_nothing_lost, fleet_entries, log_entries, publish_entries,
                                   read_as_dead_consumer, scrape, wait_or_explain, with_metrics)
from tests.helpers import BASE_MS, ROOT, ServiceProcess, payload, pending_count, row_count

SUMMARY = re.compile(r"^claimed=(\d+) inserted=(\d+) duplicate=(\d+) dead_lettered=(\d+) failed=(\d+)")


def _all_stored(client, keys, pg_url, rows: int) -> bool:
    return row_count(pg_url) == rows and pending_count(client, keys["stream"], keys["group"]) == 0


def test_poison_entries_are_dead_lettered_and_the_rest_written(fault_env, redis_client, pg_url, pg_conn, keys):
    with pg_conn.cursor() as cur:  # a rule added downstream that one valid-looking position breaks
        cur.execute("ALTER TABLE positions ADD CONSTRAINT sane_speed CHECK (speed <= 400)")
    entries = fleet_entries(18, devices=6)
    entries.insert(5, {b"payload": b'{"device_id": "356307042441013", "timestamp": '})
    entries.insert(12, {b"payload": payload("356307042441014", BASE_MS, speed=999.0)})
    env = dict(fault_env, RECLAIM_IDLE_MS="300", MAX_DELIVERIES="3")
    with ServiceProcess(env) as proc:
        published = publish_entries(redis_client, keys["stream"], entries)
        malformed, rejected = list(published)[5], list(published)[12]
        wait_or_explain(proc, lambda: redis_client.xlen(keys["dead"]) == 2
                        and _all_stored(redis_client, keys, pg_url, 18), 30, 0.05, "18 rows and 2 dead letters")
        proc.signal(signal.SIGTERM)
        assert proc.wait(20) == 0
        refusals = log_entries(proc, f"row rejected by PostgreSQL, entry {rejected}", "warning")
    outcome = assert_nothing_lost(redis_client, pg_url, keys, published, letters={rejected: "db_rejected"})
    assert outcome == Outcome(18, {"invalid_json": 1, "db_rejected": 1}, {malformed: 1, rejected: 3})
    assert len(refusals) == 3  # refused on each of its MAX_DELIVERIES deliveries, then dead-lettered
    [letter] = [f for _, f in redis_client.xrange(keys["dead"]) if f[b"source_id"] == rejected.encode()]
    assert b"sane_speed" in letter[b"detail"]


def test_a_dead_consumers_entries_are_written_within_idle_time_plus_one_reclaim_interval(
        fault_env, redis_client, pg_url, keys):
    idle_s, interval_s, margin_s = 1.0, 0.5, 1.5  # the pipeline reclaims every RECLAIM_IDLE_MS / 2
    env, metrics = with_metrics(dict(fault_env, RECLAIM_IDLE_MS=str(int(idle_s * 1000))))
    entries = [{b"payload": payload(f"orphan-{n % 10}", BASE_MS + n)} for n in range(200)]
    with ServiceProcess(env) as proc:
        proc.wait_for_log("processor ready")
        # In one transaction, so the running instance (blocked on '>') never sees them as new.
        pipe = redis_client.pipeline(transaction=True)
        for fields in entries:
            pipe.xadd(keys["stream"], fields)
        pipe.xreadgroup(keys["group"], "dead-consumer", {keys["stream"]: ">"}, count=len(entries))
        *ids, reply = pipe.execute()
        read_at = time.monotonic()
        assert len(reply[0][1]) == 200
        published = {i.decode(): f for i, f in zip(ids, entries)}
        time.sleep(max(read_at + idle_s * 0.8 - time.monotonic(), 0))
        assert row_count(pg_url) == 0, "claimed before RECLAIM_IDLE_MS"
        wait_or_explain(proc, lambda: _all_stored(redis_client, keys, pg_url, 200),
                        read_at + idle_s + interval_s + margin_s - time.monotonic(), 0.02, "the orphans written")
        took = time.monotonic() - read_at
        assert scrape(metrics, "processor_reclaimed_total") == 200
        proc.signal(signal.SIGTERM)
        assert proc.wait(20) == 0
    print(f"measured: orphans written {took:.2f}s after they were read (bound {idle_s + interval_s:.1f}s + margin)")
    assert idle_s <= took, took
    assert assert_nothing_lost(redis_client, pg_url, keys, published) == Outcome(200, {}, {})


def test_entries_trimmed_while_pending_on_a_dead_consumer_are_counted_logged_and_acknowledged(
        fault_env, redis_client, pg_url, keys):
    published = publish_entries(redis_client, keys["stream"],
                                [{b"payload": payload(f"trim-{n % 7}", BASE_MS + n)} for n in range(100)])
    ids = list(published)
    assert read_as_dead_consumer(redis_client, keys["stream"], keys["group"], 100) == ids
    assert redis_client.xtrim(keys["stream"], minid=ids[40], approximate=False) == 40  # the oldest go
    assert redis_client.xdel(keys["stream"], *ids[50:60]) == 10
    gone = ids[:40] + ids[50:60]
    env, metrics = with_metrics(dict(fault_env, RECLAIM_IDLE_MS="300"))
    with ServiceProcess(env) as proc:
        wait_or_explain(proc, lambda: _all_stored(redis_client, keys, pg_url, 50), 30, 0.05, "50 rows, nothing pending")
        lost = scrape(metrics, "processor_entries_lost_total")
        proc.signal(signal.SIGTERM)
        assert proc.wait(20) == 0
        errors = log_entries(proc, "has no data (trimmed or deleted): lost, acknowledging it", "error")
    assert lost == 50
    assert sorted(re.search(r"pending entry (\S+) ", e["msg"]).group(1) for e in errors) == sorted(gone)
    assert assert_nothing_lost(redis_client, pg_url, keys, published, gone=gone) == Outcome(50, {}, {})


def test_entries_deleted_from_a_restarted_consumers_own_pending_list_are_lost_and_acknowledged(
        fault_env, redis_client, pg_url, keys):
    # The service's previous life read them (same CONSUMER_NAME) and died; then some were deleted.
    published = publish_entries(redis_client, keys["stream"],
                                [{b"payload": payload(f"own-{n % 7}", BASE_MS + n)} for n in range(100)])
    ids = list(published)
    read_as_dead_consumer(redis_client, keys["stream"], keys["group"], 100, consumer=keys["consumer"])
    assert redis_client.xdel(keys["stream"], *ids[::5]) == 20
    env, metrics = with_metrics(dict(fault_env, RECLAIM_IDLE_MS="3600000"))  # rule 4 alone, no reclaim
    with ServiceProcess(env) as proc:
        wait_or_explain(proc, lambda: _all_stored(redis_client, keys, pg_url, 80), 30, 0.05, "80 rows, nothing pending")
        lost = scrape(metrics, "processor_entries_lost_total")
        proc.signal(signal.SIGTERM)
        assert proc.wait(20) == 0
        errors = log_entries(proc, "has no data (trimmed or deleted)", "error")
    assert lost == 20 and len(errors) == 20
    assert assert_nothing_lost(redis_client, pg_url, keys, published, gone=ids[::5]) == Outcome(80, {}, {})


def _replay(env: dict[str, str], *args: str) -> tuple[int, str, str]:
    done = subprocess.run([sys.executable, str(ROOT / "processor.py"), "replay", *args], cwd=str(ROOT), env=env,
                          capture_output=True, text=True, timeout=120)
    return done.returncode, done.stdout, done.stderr


def test_replay_with_a_limit_pages_through_5000_pending_entries(fault_env, redis_client, pg_url, keys):
    valid = fleet_entries(4_800, seed=8)
    entries = valid + valid[:150] + [{b"payload": b"\xff not json %d" % n} for n in range(50)]
    published = publish_entries(redis_client, keys["stream"], entries)
    assert len(read_as_dead_consumer(redis_client, keys["stream"], keys["group"], 5_000)) == 5_000
    runs = []
    while True:
        code, out, err = _replay(fault_env, "--min-idle-ms", "0", "--limit", "1500")
        assert code == 0, (out, err)
        [line] = out.splitlines()
        runs.append(tuple(int(v) for v in SUMMARY.match(line).groups()))
        if runs[-1][0] == 0 or len(runs) > 6:
            break
    print(f"measured: replay runs {runs}")
    claimed, inserted, duplicate, dead, failed = (sum(col) for col in zip(*runs))
    assert [r[0] for r in runs] == [1500, 1500, 1500, 500, 0]
    assert all(r[0] == r[1] + r[2] + r[3] and r[4] == 0 for r in runs), runs
    assert (claimed, inserted, duplicate, dead, failed) == (5000, 4800, 150, 50, 0)
    assert [c["name"].decode() for c in redis_client.xinfo_consumers(keys["stream"], keys["group"])] == \
        ["dead-consumer"]
    outcome = assert_nothing_lost(redis_client, pg_url, keys, published)
    assert outcome.rows == 4_800 and outcome.dead_letters == {"invalid_json": 50}
