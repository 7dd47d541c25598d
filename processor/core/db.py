"""PostgreSQL connections: connect with retry, error translation, and the migration."""

from __future__ import annotations

import logging
import threading
import time
from importlib import resources
from typing import Any, Callable, TypeVar

import psycopg2
import psycopg2.extensions
import psycopg2.errors

from .errors import MigrationError, RowRejectedError, TransientError
from .redact import redact

log = logging.getLogger(__name__)

# Any constant fits: it only has to be the same for every instance of the processor.
MIGRATION_LOCK_KEY = 0x7465_6C65  # "tele"
BACKOFF_START_S = 0.5
BACKOFF_MAX_S = 30.0
CONNECT_TIMEOUT_S = 5

# SQLSTATE classes that mean "try again", not "the row is bad".
_TRANSIENT_SQLSTATES = {
    "40001",  # serialization_failure
    "40P01",  # deadlock_detected
    "57014",  # query_canceled (statement_timeout, pg_cancel_backend)
    "55P03",  # lock_not_available
    "53300",  # too_many_connections
}
# connection, resources, operator intervention, system; and 42 (a missing table, column or privilege): no row
# is at fault there, an operator must fix the database, and until then nothing is acknowledged.
_TRANSIENT_CLASSES = ("08", "42", "53", "57", "58")

T = TypeVar("T")


def classify(exc: BaseException) -> type[TransientError] | type[RowRejectedError] | None:
    """Which of *our* errors a psycopg2 exception is, or None for a bug of ours."""
    if isinstance(exc, (psycopg2.OperationalError, psycopg2.InterfaceError)):
        return TransientError
    code = getattr(exc, "pgcode", None) or ""
    if code in _TRANSIENT_SQLSTATES or code[:2] in _TRANSIENT_CLASSES:
        return TransientError
    if isinstance(exc, (psycopg2.IntegrityError, psycopg2.DataError, psycopg2.InternalError,
                        psycopg2.errors.RaiseException)):
        return RowRejectedError
    if isinstance(exc, psycopg2.DatabaseError) and code[:2] in ("22", "23", "P0", "XX"):
        # data exceptions, constraint violations, trigger RAISEs: the row's own fault
        return RowRejectedError
    return None


def describe(exc: BaseException) -> str:
    """One line for a database error, credentials masked.

    When the server ended the session with FATAL, psycopg2's exception only says "server
    closed the connection unexpectedly"; libpq's own message for the connection still holds
    the FATAL line (the real cause), so that one is used.
    """
    text = " ".join(str(exc).split()) or type(exc).__name__
    fuller = " ".join(_connection_error(exc).split())
    if "FATAL" in fuller and "FATAL" not in text:
        text = fuller
    return redact(text)


def _connection_error(exc: BaseException) -> str:
    """libpq's last error message for the connection the failed cursor belonged to ("" if none)."""
    try:
        return str(exc.cursor.connection.info.error_message or "")  # type: ignore[attr-defined]
    except Exception:  # noqa: BLE001 - no cursor, no connection, an older psycopg2: nothing more to say
        return ""


def connect(dsn: str, *, application_name: str = "telemetry-processor") -> Any:
    """One connection, or :class:`TransientError` (never a traceback for a refused connection)."""
    try:
        # TCP keepalives: a dead network path must fail a running statement, not hang it for ever.
        conn = psycopg2.connect(dsn, connect_timeout=CONNECT_TIMEOUT_S, application_name=application_name,
                                keepalives=1, keepalives_idle=30, keepalives_interval=10, keepalives_count=3)
    except psycopg2.Error as exc:
        raise TransientError(describe(exc)) from exc
    conn.autocommit = False
    return conn


def retry(what: str, attempt: Callable[[], T], *, stop: threading.Event,
          backoff_start: float = BACKOFF_START_S, backoff_max: float = BACKOFF_MAX_S,
          on_error: Callable[[TransientError], None] | None = None,
          tick: Callable[[], None] | None = None) -> T | None:
    """Call ``attempt`` until it succeeds; back off exponentially (capped) on TransientError.

    One warning per failed attempt, with the reason. Returns None if ``stop`` is set first.
    ``tick`` is called about once a second while waiting (it keeps /healthz alive during start-up).
    """
    delay = backoff_start
    attempts = 0
    while not stop.is_set():
        attempts += 1
        try:
            return attempt()
        except TransientError as exc:
            if on_error is not None:
                on_error(exc)
            log.warning("%s failed (attempt %d), retrying in %.1fs: %s", what, attempts, delay, exc)
            if _wait(stop, delay, tick):
                break
            delay = min(delay * 2, backoff_max)
    return None


def _wait(stop: threading.Event, delay: float, tick: Callable[[], None] | None) -> bool:
    """Wait ``delay`` seconds or until ``stop``; True if stopped."""
    if tick is None:
        return stop.wait(delay)
    remaining = delay
    while remaining > 0:
        tick()
        if stop.wait(min(remaining, 1.0)):
            return True
        remaining -= 1.0
    return False


def connect_with_retry(dsn: str, *, stop: threading.Event, **kwargs: Any) -> Any:
    """A connection, retrying with backoff until it comes or ``stop`` is set (then None)."""
    return retry("connect to PostgreSQL", lambda: connect(dsn), stop=stop, **kwargs)


def schema_sql() -> str:
    """The text of ``schema.sql``, shipped inside the package."""
    return resources.files("processor").joinpath("schema.sql").read_text(encoding="utf-8")


LOCK_POLL_S = 0.2


def migrate(conn: Any, *, stop: threading.Event | None = None) -> bool:
    """Apply ``schema.sql`` under a session advisory lock, so concurrent starts do not race.

    The lock is taken with ``pg_try_advisory_lock`` in a loop, so a stop request is seen while
    another session holds it (then False is returned and nothing was applied). The schema's
    warnings (TimescaleDB installed but not preloaded) are logged as warnings.

    Raises TransientError when the connection fails, MigrationError for any other
    database error (a missing privilege, a conflicting object), with the error that
    caused it: a failing unlock never hides it.
    """
    sql = schema_sql()
    try:
        conn.autocommit = True
        with conn.cursor() as cur:
            if not _advisory_lock(cur, stop):
                return False
            try:
                cur.execute(sql)
            finally:
                _unlock_quietly(conn, cur)
            kind = _positions_kind(cur)
    except (psycopg2.OperationalError, psycopg2.InterfaceError) as exc:
        raise TransientError(describe(exc)) from exc
    except psycopg2.Error as exc:
        raise MigrationError(describe(exc)) from exc
    finally:
        _log_notices(conn)
        if not conn.closed:
            conn.autocommit = False
    log.info("migrations applied: positions is %s", kind)
    return True


def _advisory_lock(cur: Any, stop: threading.Event | None) -> bool:
    """Take the migration lock, waiting while another session holds it; False if ``stop`` came first."""
    waited = False
    while True:
        cur.execute("SELECT pg_try_advisory_lock(%s)", (MIGRATION_LOCK_KEY,))
        if cur.fetchone()[0]:
            return True
        if not waited:
            log.info("waiting for the migration lock (another instance is applying schema.sql)")
            waited = True
        if stop is None:
            time.sleep(LOCK_POLL_S)
        elif stop.wait(LOCK_POLL_S):
            return False


def _unlock_quietly(conn: Any, cur: Any) -> None:
    """Release the lock; on a connection that died the lock went with it, and the error that
    killed it is the one to report, not "cursor already closed"."""
    if conn.closed or cur.closed:
        return
    try:
        cur.execute("SELECT pg_advisory_unlock(%s)", (MIGRATION_LOCK_KEY,))
    except psycopg2.Error as exc:
        log.debug("advisory unlock failed (the session is gone, and its lock with it): %s", describe(exc))


def _positions_kind(cur: Any) -> str:
    cur.execute("SELECT EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'timescaledb')")
    if cur.fetchone()[0]:
        cur.execute("SELECT count(*) FROM timescaledb_information.hypertables WHERE hypertable_name = 'positions'")
        if cur.fetchone()[0]:
            return "a TimescaleDB hypertable"
    return "a plain PostgreSQL table"


def _log_notices(conn: Any) -> None:
    """The server's WARNINGs from schema.sql as warnings (they need an operator), the rest at debug."""
    for notice in getattr(conn, "notices", []) or []:
        text = " ".join(str(notice).split())
        if text.startswith("WARNING"):
            log.warning("schema.sql: %s", text.removeprefix("WARNING:").strip())
        else:
            log.debug("schema.sql: %s", text)
    if getattr(conn, "notices", None):
        del conn.notices[:]
