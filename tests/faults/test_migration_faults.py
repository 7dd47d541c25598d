"""Migrations on a database that is up but not as expected (issue 11: 8).

TimescaleDB installed but not in ``shared_preload_libraries`` is the usual first-install
mistake: ``CREATE EXTENSION`` then ends the session with FATAL, which no exception handler
in ``schema.sql`` can catch. The schema must look before it leaps, and any failure must be
reported with its real cause.
"""

from __future__ import annotations

import signal
import subprocess
import time

import psycopg2
import pytest

from tests.faults.conftest import assert_nothing_lost, fleet_entries, log_entries, publish_entries, wait_or_explain
from tests.helpers import ROOT, ServiceProcess, pending_count, row_count

PRELOAD_WARNING = "not in shared_preload_libraries"


def _timescaledb_installed(url: str) -> bool:
    conn = psycopg2.connect(url)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT EXISTS (SELECT 1 FROM pg_available_extensions WHERE name = 'timescaledb')")
            return bool(cur.fetchone()[0])
    finally:
        conn.close()


def _is_plain_table(url: str) -> bool:
    conn = psycopg2.connect(url)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT extname FROM pg_extension WHERE extname = 'timescaledb'")
            enabled = cur.fetchone() is not None
            cur.execute("SELECT relkind FROM pg_class WHERE relname = 'positions'")
            return not enabled and cur.fetchone() == ("r",)
    finally:
        conn.close()


@pytest.fixture
def unpreloaded_postgres(throwaway_postgres_factory):
    """A fresh server where TimescaleDB is installed but not preloaded (no schema yet)."""
    server = throwaway_postgres_factory(schema=False)
    if not _timescaledb_installed(server.url):
        message = "TimescaleDB is not installed (../shared/timescaledb/install.sh): nothing to mis-configure"
        if __import__("os").environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(message)
        pytest.skip(message)
    return server


@pytest.mark.backends("plain")  # the server must not preload TimescaleDB
def test_timescaledb_not_preloaded_gives_a_plain_table_one_warning_and_a_working_service(
        fault_env, redis_client, unpreloaded_postgres, keys):
    pg = unpreloaded_postgres
    entries = fleet_entries(500, devices=20, seed=8)
    with ServiceProcess(dict(fault_env, POSTGRES_URL=pg.url)) as proc:
        proc.wait_for_log("processor ready", timeout=30)
        published = publish_entries(redis_client, keys["stream"], entries)
        wait_or_explain(proc, lambda: row_count(pg.url) == 500
                        and pending_count(redis_client, keys["stream"], keys["group"]) == 0, 30, 0.05, "500 rows")
        proc.signal(signal.SIGTERM)
        assert proc.wait(15) == 0
        warnings = log_entries(proc, PRELOAD_WARNING, "warning")
        applied = log_entries(proc, "migrations applied", "info")
        failures = log_entries(proc, "failed", "warning")
    assert len(warnings) == 1, warnings
    assert "shared_preload_libraries" in warnings[0]["msg"]
    assert [e["msg"] for e in applied] == ["migrations applied: positions is a plain PostgreSQL table"]
    assert failures == []  # no retry loop, no "cursor already closed"
    assert _is_plain_table(pg.url)
    assert assert_nothing_lost(redis_client, pg.url, keys, published).rows == 500


@pytest.mark.backends("plain")  # the server must not preload TimescaleDB
def test_psql_bootstrap_on_an_unpreloaded_server_exits_0_twice_with_the_warning(unpreloaded_postgres):
    for _ in range(2):
        result = subprocess.run(["psql", "-X", "-v", "ON_ERROR_STOP=1", "-f", str(ROOT / "schema.sql"),
                                 unpreloaded_postgres.url], capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr
        assert PRELOAD_WARNING in result.stderr
        assert "FATAL" not in result.stderr
    assert _is_plain_table(unpreloaded_postgres.url)


def test_a_migration_whose_session_dies_reports_the_real_cause(empty_pg_url, monkeypatch):
    """A statement of schema.sql ends the session with FATAL (as CREATE EXTENSION timescaledb does
    when the library is not preloaded): the error raised names that, not the unlock in the clean-up
    that could no longer run ("cursor already closed")."""
    from processor.core import db
    from processor.core.errors import TransientError

    monkeypatch.setattr(db, "schema_sql", lambda: "SELECT pg_terminate_backend(pg_backend_pid())")
    conn = db.connect(empty_pg_url)
    try:
        with pytest.raises(TransientError) as caught:
            db.migrate(conn)
    finally:
        conn.close()
    assert "terminating connection due to administrator command" in str(caught.value), caught.value
    assert "already closed" not in str(caught.value)


def test_a_stop_while_waiting_for_the_migration_lock_exits_0_at_once(fault_env, throwaway_postgres_factory):
    pg = throwaway_postgres_factory(schema=False)
    holder = psycopg2.connect(pg.url)
    holder.autocommit = True
    from processor.core.db import MIGRATION_LOCK_KEY

    with holder.cursor() as cur:
        cur.execute("SELECT pg_advisory_lock(%s)", (MIGRATION_LOCK_KEY,))
    try:
        with ServiceProcess(dict(fault_env, POSTGRES_URL=pg.url)) as proc:
            proc.wait_for_log("waiting for the migration lock")
            started = time.monotonic()
            proc.signal(signal.SIGTERM)
            assert proc.wait(5) == 0
            took = time.monotonic() - started
            messages = proc.messages()
    finally:
        holder.close()
    print(f"measured: exit 0 {took:.2f}s after SIGTERM while the migration lock was held elsewhere")
    assert took < 2.0
    assert "processor ready" not in messages and "processor stopped" in messages
