"""`processor.py replay` (CONTRACT 6): the cron backstop for entries a dead instance left pending."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import threading
import time

import redis

from tests.helpers import BASE_MS, ROOT, ServiceProcess, free_port, payload, pending_count, row_count, wait_until

SUMMARY = re.compile(r"^claimed=(\d+) inserted=(\d+) duplicate=(\d+) dead_lettered=(\d+) failed=(\d+) lost=(\d+)")


def run_cli(env: dict[str, str], *args: str, timeout: float = 120) -> tuple[int, str, str, float]:
    """``processor.py ARGS``: (exit status, stdout, stderr, seconds taken)."""
    started = time.monotonic()
    done = subprocess.run([sys.executable, str(ROOT / "processor.py"), *args], cwd=str(ROOT), env=env,
                          capture_output=True, text=True, timeout=timeout)
    return done.returncode, done.stdout, done.stderr, time.monotonic() - started


def _orphans(client, keys, n: int, start: int = 0, prefix: str = "orphan") -> list[str]:
    """``n`` entries read by a consumer that then died, never acknowledged."""
    pipe = client.pipeline(transaction=False)
    for i in range(start, start + n):
        pipe.xadd(keys["stream"], {"payload": payload(f"{prefix}-{i % 10}", BASE_MS + i)})
    ids = [i.decode() for i in pipe.execute()]
    try:
        client.xgroup_create(keys["stream"], keys["group"], id="0")
    except Exception as exc:  # noqa: BLE001 - BUSYGROUP: it exists already
        assert "BUSYGROUP" in str(exc)
    client.xreadgroup(keys["group"], "dead-consumer", {keys["stream"]: ">"}, count=n)
    return ids


def _consumers(client, keys) -> dict[str, int]:
    return {c["name"].decode(): int(c["pending"]) for c in client.xinfo_consumers(keys["stream"], keys["group"])}


def test_dry_run_reports_the_eligible_count_and_changes_nothing(service_env, redis_client, pg_url, keys):
    _orphans(redis_client, keys, 120)
    before = redis_client.xpending_range(keys["stream"], keys["group"], "-", "+", 1000)
    code, out, _, _ = run_cli(service_env, "replay", "--dry-run", "--min-idle-ms", "0")
    assert (code, out) == (0, "claimed=0 inserted=0 duplicate=0 dead_lettered=0 failed=0 lost=0 "
                              "eligible=120 dry_run=true\n")
    assert run_cli(service_env, "replay", "--dry-run", "--min-idle-ms", "0", "--limit", "50")[1].endswith(
        "eligible=50 dry_run=true\n")
    assert run_cli(service_env, "replay", "--dry-run", "--min-idle-ms", "3600000")[1].endswith(
        "eligible=0 dry_run=true\n")
    after = redis_client.xpending_range(keys["stream"], keys["group"], "-", "+", 1000)
    # Same entries, same owner, same delivery count: nothing was claimed.
    assert [(p["message_id"], p["consumer"], p["times_delivered"]) for p in after] == \
        [(p["message_id"], p["consumer"], p["times_delivered"]) for p in before]
    assert _consumers(redis_client, keys) == {"dead-consumer": 120}
    assert row_count(pg_url) == 0 and redis_client.xlen(keys["dead"]) == 0


def test_replay_with_nothing_pending_prints_zeros_and_exits_0(service_env, redis_client, keys):
    redis_client.xgroup_create(keys["stream"], keys["group"], id="0", mkstream=True)
    code, out, _, _ = run_cli(service_env, "replay", "--min-idle-ms", "0")
    assert (code, out) == (0, "claimed=0 inserted=0 duplicate=0 dead_lettered=0 failed=0 lost=0\n")
    assert _consumers(redis_client, keys) == {}


def test_replay_settles_every_claimed_entry_and_removes_its_own_consumer(service_env, redis_client, pg_url, keys):
    _orphans(redis_client, keys, 300)
    redis_client.xadd(keys["stream"], {"payload": b"[1, 2]"})
    redis_client.xreadgroup(keys["group"], "dead-consumer", {keys["stream"]: ">"})
    _orphans(redis_client, keys, 20)  # positions 0..19 again: duplicates of stored rows
    code, out, _, _ = run_cli(service_env, "replay", "--min-idle-ms", "0")
    assert (code, out) == (0, "claimed=321 inserted=300 duplicate=20 dead_lettered=1 failed=0 lost=0\n")
    assert row_count(pg_url) == 300
    assert pending_count(redis_client, keys["stream"], keys["group"]) == 0
    assert _consumers(redis_client, keys) == {"dead-consumer": 0}  # the replay consumer is gone
    [letter] = redis_client.xrange(keys["dead"])
    assert letter[1][b"reason"] == b"invalid_type"


def test_replay_claims_only_entries_idle_long_enough(service_env, redis_client, pg_url, keys):
    _orphans(redis_client, keys, 10)
    time.sleep(1.2)
    _orphans(redis_client, keys, 10, start=10)
    code, out, _, _ = run_cli(service_env, "replay", "--min-idle-ms", "1000")
    assert (code, out) == (0, "claimed=10 inserted=10 duplicate=0 dead_lettered=0 failed=0 lost=0\n")
    assert _consumers(redis_client, keys) == {"dead-consumer": 10}


def test_replay_exits_1_when_postgres_is_unreachable_and_claims_nothing(service_env, redis_client, pg_url, keys):
    """CONTRACT 4 rule 14: no claiming while PostgreSQL is not writable, so a cron run during an
    outage changes nothing (a claim would count a delivery for an entry that cannot be written)."""
    _orphans(redis_client, keys, 50)
    before = redis_client.xpending_range(keys["stream"], keys["group"], "-", "+", 1000)
    env = dict(service_env, POSTGRES_URL=f"postgresql://postgres@127.0.0.1:{free_port()}/postgres",
               SHUTDOWN_TIMEOUT_S="2")
    code, out, err, took = run_cli(env, "replay", "--min-idle-ms", "0")
    assert code == 1 and out == "", (out, err)
    [line] = err.strip().splitlines()
    assert "replay failed: PostgreSQL is not writable, nothing claimed" in line and "127.0.0.1" in line, line
    after = redis_client.xpending_range(keys["stream"], keys["group"], "-", "+", 1000)
    assert [(p["message_id"], p["consumer"], p["times_delivered"]) for p in after] == \
        [(p["message_id"], p["consumer"], p["times_delivered"]) for p in before]
    assert _consumers(redis_client, keys) == {"dead-consumer": 50}
    assert redis_client.xlen(keys["dead"]) == 0
    assert took < 20, took
    # Once PostgreSQL is back, the next run settles them.
    code, out, _, _ = run_cli(service_env, "replay", "--min-idle-ms", "0")
    assert (code, out) == (0, "claimed=50 inserted=50 duplicate=0 dead_lettered=0 failed=0 lost=0\n")
    assert row_count(pg_url) == 50


def test_replay_exits_1_with_one_line_when_redis_is_unreachable(service_env):
    env = dict(service_env, REDIS_URL=f"redis://127.0.0.1:{free_port()}/0")
    code, out, err, _ = run_cli(env, "replay")
    assert code == 1 and out == ""
    assert "replay failed" in err and len(err.strip().splitlines()) == 1, err


def test_replay_alongside_a_busy_service_settles_each_entry_once(service_env, redis_client, pg_url, keys):
    _orphans(redis_client, keys, 2000)
    orphaned_at = time.monotonic()
    env = dict(service_env, BLOCK_MS="200")  # RECLAIM_IDLE_MS stays 60 s: the orphans are replay's
    replaying = threading.Event()
    live = [0]  # entries published while replay ran

    def publish_until_replayed() -> None:
        client = redis.Redis.from_url(service_env["REDIS_URL"])
        while not replaying.is_set():
            pipe = client.pipeline(transaction=False)
            for n in range(live[0], live[0] + 500):
                pipe.xadd(keys["stream"], {"payload": payload(f"live-{n % 100}", BASE_MS + n)})
            pipe.execute()
            live[0] += 500
            time.sleep(0.05)
        client.close()

    with ServiceProcess(env) as proc:
        proc.wait_for_log("processor ready")
        time.sleep(max(orphaned_at + 1.2 - time.monotonic(), 0))
        publisher = threading.Thread(target=publish_until_replayed)
        publisher.start()
        # The service's own entries are pending for milliseconds: a 1 s idle time leaves them alone.
        code, out, _, _ = run_cli(service_env, "replay", "--min-idle-ms", "1000")
        replaying.set()
        publisher.join(30)
        total = 2000 + live[0]
        wait_until(lambda: row_count(pg_url) == total
                   and pending_count(redis_client, keys["stream"], keys["group"]) == 0, 60, 0.1, "every row")
        proc.signal(signal.SIGTERM)
        assert proc.wait(20) == 0
    assert (code, out) == (0, "claimed=2000 inserted=2000 duplicate=0 dead_lettered=0 failed=0 lost=0\n")
    assert live[0] >= 1000, live  # the service was writing all along


def test_replay_before_the_group_exists_claims_nothing_and_exits_0(service_env, redis_client, keys):
    # A new deployment: cron runs replay before the service ever created its group.
    redis_client.xadd(keys["stream"], {"payload": b"{}"})
    code, out, err, _ = run_cli(service_env, "replay")
    assert (code, out) == (0, "claimed=0 inserted=0 duplicate=0 dead_lettered=0 failed=0 lost=0\n"), err
    code, out, err, _ = run_cli(service_env, "replay", "--dry-run")
    assert code == 0 and out.endswith("eligible=0 dry_run=true\n"), (out, err)
    assert redis_client.xinfo_groups(keys["stream"]) == []  # replay creates nothing
