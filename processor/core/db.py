"""PostgreSQL connections: connect with retry, error translation, and the migration."""

from __future__ import annotations

import logging
import threading
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
    """One line for a database error, credentials masked."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return redact(text)


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


def migrate(conn: Any) -> None:
    """Apply ``schema.sql`` under a session advisory lock, so concurrent starts do not race.

    Raises TransientError when the connection fails, MigrationError for any other
    database error (a missing privilege, a conflicting object).
    """
    sql = schema_sql()
    try:
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute("SELECT pg_advisory_lock(%s)", (MIGRATION_LOCK_KEY,))
            try:
                cur.execute(sql)
            finally:
                cur.execute("SELECT pg_advisory_unlock(%s)", (MIGRATION_LOCK_KEY,))
    except (psycopg2.OperationalError, psycopg2.InterfaceError) as exc:
        raise TransientError(describe(exc)) from exc
    except psycopg2.Error as exc:
        raise MigrationError(describe(exc)) from exc
    finally:
        if not conn.closed:
            conn.autocommit = False
    log.info("migrations applied")
