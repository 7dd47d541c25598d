"""Graceful shutdown (CONTRACT 8), with the real process and real signals."""

from __future__ import annotations

import signal
import time

from tests.helpers import (BASE_MS, ServiceProcess, hold_write_lock, payload, pending_count, publish, row_count,
                           wait_until)

LIFECYCLE = ["processor starting", "Postgres connected", "migrations applied", "Redis connected",
             "consumer started on stream", "processor ready"]


def _in_order(messages: list[str], expected: list[str]) -> bool:
    it = iter(messages)
    return all(any(want in m for m in it) for want in expected)


def _load(redis_client, keys, n: int = 500) -> list[str]:
    return publish(redis_client, keys["stream"], [payload(f"d{i % 10}", BASE_MS + i) for i in range(n)])


def test_sigterm_while_idle_exits_0_within_2_seconds(service_env):
    with ServiceProcess(service_env) as proc:
        proc.wait_for_log("processor ready")
        time.sleep(0.3)
        started = time.monotonic()
        proc.signal(signal.SIGTERM)
        assert proc.wait(10) == 0
        elapsed = time.monotonic() - started
        messages = proc.messages()
    assert elapsed < 2.0, f"took {elapsed:.2f}s"
    assert _in_order(messages, LIFECYCLE + ["processor stopped"]), messages


def test_sigterm_waits_for_a_write_blocked_by_a_lock_then_exits_0(service_env, redis_client, pg_url, keys):
    _load(redis_client, keys)
    blocker = hold_write_lock(pg_url)
    with ServiceProcess(service_env) as proc:
        wait_until(lambda: pending_count(redis_client, keys["stream"], keys["group"]) == 500, 30)
        proc.signal(signal.SIGTERM)
        time.sleep(3)
        assert proc.proc.poll() is None, "it must wait for the in-flight write"
        blocker.rollback()
        assert proc.wait(15) == 0
    blocker.close()
    # every acknowledged entry has its row: here, all of them
    assert pending_count(redis_client, keys["stream"], keys["group"]) == 0
    assert row_count(pg_url) == 500


def test_write_outlasting_the_shutdown_timeout_exits_1_and_leaves_entries_pending(
        service_env, redis_client, pg_url, keys):
    _load(redis_client, keys)
    blocker = hold_write_lock(pg_url)
    env = dict(service_env, SHUTDOWN_TIMEOUT_S="4")
    with ServiceProcess(env) as proc:
        wait_until(lambda: pending_count(redis_client, keys["stream"], keys["group"]) == 500, 30)
        started = time.monotonic()
        proc.signal(signal.SIGTERM)
        assert proc.wait(20) == 1
        elapsed = time.monotonic() - started
        messages = proc.messages()
    assert 4.0 <= elapsed < 12.0, elapsed
    assert any("shutdown timeout: 500 entries not settled" in m for m in messages), messages
    assert pending_count(redis_client, keys["stream"], keys["group"]) == 500
    assert row_count(pg_url) == 0
    blocker.rollback()
    blocker.close()
    # The next start writes them: its own pending entries first.
    with ServiceProcess(service_env) as proc:
        wait_until(lambda: row_count(pg_url) == 500
                   and pending_count(redis_client, keys["stream"], keys["group"]) == 0, 30)
        proc.signal(signal.SIGTERM)
        assert proc.wait(10) == 0


def test_a_second_signal_exits_at_once(service_env, redis_client, pg_url, keys):
    _load(redis_client, keys, 100)
    blocker = hold_write_lock(pg_url)
    with ServiceProcess(service_env) as proc:
        wait_until(lambda: pending_count(redis_client, keys["stream"], keys["group"]) == 100, 30)
        proc.signal(signal.SIGTERM)
        time.sleep(0.5)
        started = time.monotonic()
        proc.signal(signal.SIGINT)
        assert proc.wait(5) == 1
        assert time.monotonic() - started < 2.0
    blocker.rollback()
    blocker.close()
    assert pending_count(redis_client, keys["stream"], keys["group"]) == 100  # nothing lost: still pending
