"""The shutdown deadline holds in every state (issue 11: 7; CONTRACT 8).

A server that stops answering (a dead network path, a hung host) is the hard case: TCP
keepalives see a live peer, libpq waits, and its cancel request waits too. The proxy of
tests/proxy.py plays that server. The rule: exit within SHUTDOWN_TIMEOUT_S + 2 s of the
SIGTERM, at once on a second signal, and nothing acknowledged that is not stored.
"""

from __future__ import annotations

import signal
import time
from contextlib import contextmanager

import psycopg2
import pytest

from tests.faults.conftest import (assert_nothing_lost, fleet_entries, log_entries, publish_entries,
                                   wait_or_explain)
from tests.helpers import BASE_MS, ServiceProcess, hold_write_lock, payload, pending_count, row_count, wait_until
from tests.proxy import TcpProxy

TIMEOUT_S = 3.0
MARGIN_S = 2.0

# A silent server and the stop sequence: the kind of table behind it changes nothing.
pytestmark = pytest.mark.backends("plain")


@pytest.fixture
def silent_postgres(throwaway_postgres):
    """(server, proxy): PostgreSQL behind a proxy the test can make stop answering."""
    with TcpProxy(throwaway_postgres.port) as proxy:
        yield throwaway_postgres, proxy


def _through(proxy: TcpProxy, pg) -> str:
    return proxy.url(pg.url, pg.port)


@contextmanager
def _write_waiting(fault_env, redis_client, keys, pg, proxy, n: int = 300, connected: bool = False):
    """A running service whose write of ``n`` entries waits on a server that stopped answering.

    ``connected``: one writer thread, its connection made (one entry written) before the server
    goes silent, so the write waits inside a statement, not inside libpq's connect.
    """
    env = dict(fault_env, POSTGRES_URL=_through(proxy, pg), SHUTDOWN_TIMEOUT_S=str(TIMEOUT_S))
    if connected:
        env["WRITER_THREADS"] = "1"
    with ServiceProcess(env) as proc:
        proc.wait_for_log("processor ready")
        if connected:
            redis_client.xadd(keys["stream"], {"payload": payload("356307042449999", BASE_MS - 60_000)})
            wait_or_explain(proc, lambda: row_count(pg.url) == 1, 20, 0.05, "the warm-up row")
        proxy.freeze()
        published = publish_entries(redis_client, keys["stream"], fleet_entries(n, devices=30, seed=7), atomic=True)
        wait_or_explain(proc, lambda: pending_count(redis_client, keys["stream"], keys["group"]) == n, 20, 0.05,
                        "the batch read and its write under way")
        time.sleep(0.5)  # the write is now inside libpq, waiting for an answer that never comes
        yield proc, published


def test_sigterm_while_a_write_waits_on_a_silent_server_exits_1_within_the_deadline(
        fault_env, redis_client, silent_postgres, keys):
    pg, proxy = silent_postgres
    with _write_waiting(fault_env, redis_client, keys, pg, proxy) as (proc, published):
        started = time.monotonic()
        proc.signal(signal.SIGTERM)
        code = proc.wait(TIMEOUT_S + 10)
        took = time.monotonic() - started
        unsettled = log_entries(proc, "entries not settled", "error")
    print(f"measured: exit {code} {took:.2f}s after SIGTERM (SHUTDOWN_TIMEOUT_S={TIMEOUT_S:.0f})")
    assert code == 1
    assert TIMEOUT_S - 0.5 <= took <= TIMEOUT_S + MARGIN_S, took
    assert unsettled and "300 entries not settled" in unsettled[0]["msg"], unsettled
    assert pending_count(redis_client, keys["stream"], keys["group"]) == 300  # nothing acknowledged
    proxy.cut()  # the bytes the proxy held must not reach the server after the fact
    proxy.thaw()
    with ServiceProcess(dict(fault_env, POSTGRES_URL=pg.url)) as again:
        wait_or_explain(again, lambda: row_count(pg.url) == 300
                        and pending_count(redis_client, keys["stream"], keys["group"]) == 0, 30, 0.1, "300 rows")
        again.signal(signal.SIGTERM)
        assert again.wait(15) == 0
    assert assert_nothing_lost(redis_client, pg.url, keys, published).rows == 300


def test_a_second_signal_exits_at_once_while_a_write_waits_on_a_silent_server(
        fault_env, redis_client, silent_postgres, keys):
    pg, proxy = silent_postgres
    with _write_waiting(fault_env, redis_client, keys, pg, proxy, n=100) as (proc, _):
        proc.signal(signal.SIGTERM)
        time.sleep(0.5)
        started = time.monotonic()
        proc.signal(signal.SIGTERM)
        code = proc.wait(10)
        took = time.monotonic() - started
    print(f"measured: exit {code} {took:.3f}s after the second SIGTERM")
    assert code == 1 and took < 1.0, took
    assert pending_count(redis_client, keys["stream"], keys["group"]) == 100  # still pending: nothing lost


def test_sigterm_past_the_deadline_while_the_cancel_itself_waits_exits_within_the_deadline(
        fault_env, redis_client, silent_postgres, keys):
    """The write outlasts the deadline and the stop sequence cancels it; the cancel's own connection
    goes through the same silent path. Neither may hold the process past the deadline."""
    pg, proxy = silent_postgres
    with _write_waiting(fault_env, redis_client, keys, pg, proxy, n=50, connected=True) as (proc, _):
        started = time.monotonic()
        proc.signal(signal.SIGTERM)
        before = proxy.connections
        wait_until(lambda: proc.proc.poll() is not None, TIMEOUT_S + 10, 0.02, "exit")
        took = time.monotonic() - started
        # The cancel's connection may still sit in the proxy's accept queue when the process exits.
        wait_until(lambda: proxy.connections > before, 3, 0.02, "the cancel's connection")
        cancels = proxy.connections - before
        aborted = log_entries(proc, "cancelling them", "warning")
    print(f"measured: exit {proc.proc.returncode} {took:.2f}s after SIGTERM; {cancels} cancel connections "
          "opened through the silent proxy")
    assert proc.proc.returncode == 1 and took <= TIMEOUT_S + MARGIN_S, took
    assert aborted and cancels >= 1  # the cancel was sent, and waited on the silent server in vain


@pytest.mark.parametrize("signals", [1, 2], ids=["one-signal", "two-signals"])
def test_sigterm_while_connecting_to_a_silent_server_at_start_up(fault_env, silent_postgres, signals):
    pg, proxy = silent_postgres
    proxy.freeze()
    env = dict(fault_env, POSTGRES_URL=_through(proxy, pg), SHUTDOWN_TIMEOUT_S=str(TIMEOUT_S))
    with ServiceProcess(env) as proc:
        wait_until(lambda: proxy.connections >= 1, 10, 0.02, "the connection attempt")
        time.sleep(0.3)  # inside libpq's connect, which waits up to its connect_timeout (5 s)
        started = time.monotonic()
        proc.signal(signal.SIGTERM)
        if signals == 2:
            time.sleep(0.2)
            proc.signal(signal.SIGINT)
        code = proc.wait(TIMEOUT_S + 10)
        took = time.monotonic() - started
        messages = proc.messages()
    print(f"measured: exit {code} {took:.2f}s after the first signal ({signals} sent) while connecting")
    if signals == 1:
        assert code == 0 and took < 1.5, (code, took)  # nothing in flight: a clean stop, now
        assert "processor stopped" in messages and "processor ready" not in messages
    else:
        assert code in (0, 1) and took < 1.0, (code, took)


def test_a_write_cancelled_at_the_deadline_leaves_no_backend_waiting(fault_env, redis_client, pg_url, pg_conn, keys):
    """Past the deadline, the waiting INSERT is cancelled on the server (pg_cancel_backend), so the
    server does not go on holding a lock queue slot for a process that has left."""
    publish_entries(redis_client, keys["stream"], fleet_entries(200, devices=10, seed=9))
    blocker = hold_write_lock(pg_url)
    try:
        with ServiceProcess(dict(fault_env, SHUTDOWN_TIMEOUT_S="2")) as proc:
            wait_or_explain(proc, lambda: _waiting_writers(pg_conn) >= 1, 20, 0.05, "a write waiting on the lock")
            proc.signal(signal.SIGTERM)
            assert proc.wait(10) == 1
        wait_until(lambda: _waiting_writers(pg_conn) == 0, 3, 0.05, "no processor backend waiting")
    finally:
        blocker.rollback()
        blocker.close()
    assert row_count(pg_url) == 0 and pending_count(redis_client, keys["stream"], keys["group"]) == 200


def _waiting_writers(conn) -> int:
    with conn.cursor() as cur:
        cur.execute("SELECT count(*) FROM pg_stat_activity WHERE application_name = 'telemetry-processor' "
                    "AND wait_event_type = 'Lock' AND datname = current_database()")
        return int(cur.fetchone()[0])


def test_cancel_connections_never_touch_another_server(throwaway_postgres_factory):
    """The cancel goes to the host and port of the connection it cancels, not to the first host of a
    multi-host URL (where the same pid may belong to someone else)."""
    from processor.core.writer import _cancel_backend

    first, second = throwaway_postgres_factory(), throwaway_postgres_factory()
    dsn = (f"postgresql://postgres@127.0.0.1:{first.port},127.0.0.1:{second.port}/postgres"
           "?target_session_attrs=any")
    victim = psycopg2.connect(second.url)
    try:
        victim.autocommit = True
        import threading

        caught: list[BaseException] = []

        def sleep() -> None:
            try:
                victim.cursor().execute("SELECT pg_sleep(30)")
            except psycopg2.Error as exc:
                caught.append(exc)

        sleeper = threading.Thread(target=sleep, daemon=True)
        sleeper.start()
        time.sleep(0.3)
        _cancel_backend(dsn, victim)
        sleeper.join(5)
    finally:
        victim.close()
    assert caught and getattr(caught[0], "pgcode", None) == "57014", caught
