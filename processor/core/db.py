"""PostgreSQL connections: connect with retry, error translation, and the migration."""

from __future__ import annotations

import enum
import logging
import threading
import time
from importlib import resources
from typing import Any, Callable, TypeVar

import psycopg2
import psycopg2.extensions
import psycopg2.errors

from .errors import MigrationError, TransientError
from .redact import redact

log = logging.getLogger(__name__)

# Any constant fits: it only has to be the same for every instance of the processor.
MIGRATION_LOCK_KEY = 0x7465_6C65  # "tele"
BACKOFF_START_S = 0.5
BACKOFF_MAX_S = 30.0
CONNECT_TIMEOUT_S = 5

class Verdict(enum.Enum):
    """What a PostgreSQL error proves (CONTRACT 4 rule 13), decided by its SQLSTATE."""

    #: the database or the link to it: hold the batch, back off, reconnect; nothing is acknowledged
    SYSTEMIC = "systemic"
    #: the database refused this row for its data: isolate it, write its neighbours
    ROW = "row"
    #: a size limit or a class we do not know: systemic, unless the row fails alone while
    #: its neighbours are written (then it is that row's fault)
    SUSPECT = "suspect"


# By SQLSTATE, never by the driver's exception class: psycopg2 files 25006 (read-only) under
# InternalError and 54000 (a size limit) under OperationalError, and a verdict must follow what
# the error proves. docs/decisions.md has the table.
_ROW_CLASSES = ("22", "23")  # data exception; integrity constraint violation
_ROW_CODES = frozenset({"P0001"})  # raise_exception: a check in a trigger refused the row
_SUSPECT_CLASSES = ("54",)  # program limit exceeded: the row's only if it fails alone
_SYSTEMIC_CLASSES = (
    "08",  # connection exception
    "25",  # invalid transaction state: 25006 read-only (a demoted primary, a full managed disk)
    "28",  # invalid authorization (a password changed under us)
    "3D",  # invalid catalog name (the database was dropped)
    "3F",  # invalid schema name
    "40",  # transaction rollback: serialization failure, deadlock
    "42",  # syntax error or access rule: insufficient privilege (42501), a missing table or column
    "53",  # insufficient resources: disk full, out of memory, too many connections
    "55",  # object not in prerequisite state: lock not available
    "57",  # operator intervention: query canceled, admin shutdown, cannot connect now
    "58",  # system error: I/O
    "F0",  # configuration file error
)

T = TypeVar("T")


def classify(exc: BaseException) -> Verdict | None:
    """What a psycopg2 exception proves; None when it is not a database's verdict (a bug of ours)."""
    if not isinstance(exc, psycopg2.Error):
        return None
    code = getattr(exc, "pgcode", None) or ""
    if not code:
        # libpq's own errors carry no SQLSTATE: the connection was refused, lost or timed out.
        if isinstance(exc, (psycopg2.OperationalError, psycopg2.InterfaceError)):
            return Verdict.SYSTEMIC
        return None  # raised by psycopg2 itself before reaching the server: a bug of ours
    if code[:2] in _ROW_CLASSES or code in _ROW_CODES:
        return Verdict.ROW
    if code[:2] in _SYSTEMIC_CLASSES:
        return Verdict.SYSTEMIC
    if code[:2] in _SUSPECT_CLASSES:
        return Verdict.SUSPECT
    return Verdict.SUSPECT  # a class the writer does not know: systemic first, the row's if it fails alone


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

    One warning per failed attempt, with the reason. Returns None if ``stop`` is set first,
    also while an attempt is still running: each attempt runs in a thread of its own and the
    caller only waits for it (a connect to a server that does not answer blocks inside libpq
    for CONNECT_TIMEOUT_S, a migration may wait for its lock), so a stop is seen at once.
    ``tick`` is called about once a second while waiting (it keeps /healthz alive during start-up).
    """
    delay = backoff_start
    attempts = 0
    while not stop.is_set():
        attempts += 1
        try:
            outcome = _interruptibly(what, attempt, stop, tick)
        except TransientError as exc:
            if on_error is not None:
                on_error(exc)
            log.warning("%s failed (attempt %d), retrying in %.1fs: %s", what, attempts, delay, exc)
            if _wait(stop, delay, tick):
                break
            delay = min(delay * 2, backoff_max)
            continue
        return None if outcome is _STOPPED else outcome  # type: ignore[return-value]
    return None


_STOPPED = object()


def _interruptibly(what: str, call: Callable[[], T], stop: threading.Event,
                   tick: Callable[[], None] | None) -> T | object:
    """``call()`` in a daemon thread; its result or its exception, or _STOPPED as soon as ``stop`` is set
    (the thread is abandoned: it ends with its call, or with the process)."""
    done = threading.Event()
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["value"] = call()
        except BaseException as exc:  # noqa: BLE001 - handed to the waiting caller as it is
            box["error"] = exc
        finally:
            done.set()

    threading.Thread(target=run, name=f"start-up: {what}", daemon=True).start()
    waited = 0.0
    while not done.wait(0.05):
        if stop.is_set():
            return _STOPPED
        waited += 0.05
        if tick is not None and waited >= 1.0:
            tick()
            waited = 0.0
    if "error" in box:
        raise box["error"]
    return box["value"]


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
