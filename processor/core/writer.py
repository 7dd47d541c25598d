"""The PostgreSQL writer: batches of records into ``positions`` (CONTRACT 2; 4, rules 1, 3, 6, 7, 13).

Every write is ``INSERT ... ON CONFLICT (device_id, ts) DO NOTHING RETURNING
device_id, ts``: the rows returned were inserted, the others were already there
(or came twice in the batch), so "the first stored wins" and nothing is ever updated.
A batch goes one of two ways, with identical results:

- fewer than ``copy_threshold`` records: one multi-row ``INSERT ... VALUES``
  (``psycopg2.extras.execute_values``), one round trip;
- otherwise: ``COPY`` (text format) into a per-connection TEMP staging table, then
  ``INSERT ... SELECT ... ORDER BY seq``, in one transaction. COPY skips the
  per-value SQL quoting and the server's parsing of a huge statement, which
  wins once batches are large (measured by bench/micro_writer.py).

Large batches are first tried the direct way: one ``COPY`` straight into
``positions``, which costs PostgreSQL about a quarter less CPU than staging
(docs/performance.md). COPY has no ON CONFLICT, so it only succeeds when every
row is new and accepted: then all are ``inserted``. A key already stored (a
redelivery), a key twice in the batch, or a row the database refuses fails the
whole COPY (rolled back; the server logs the error), and the batch goes the
staging way, whose results are the truth; the direct way then rests for
``DIRECT_COPY_REST_S``, so a stream of duplicates (a replay) pays for at most one
failed COPY per rest. The direct COPY is a statement of its own in autocommit (one
round trip, atomic as any statement). A COPY that stored fewer rows than it was
given (a ``BEFORE INSERT`` trigger that skips rows; ``positions`` has none) has
committed the others: the batch then goes the staging way too, which stores what
is missing and counts the rows already there as duplicates. COPY ignores rewrite
rules (``CREATE RULE``); ``positions`` has none.

Errors are classified where they enter, by SQLSTATE (:func:`processor.core.db.classify`,
CONTRACT 4 rule 13):

- systemic (the link, a read-only or locked or full server, a missing privilege): the
  whole attempt fails, the connection is replaced (a multi-host URL then finds the new
  primary), the job backs off and retries, nothing is acknowledged;
- the row's own fault (classes 22, 23, P0001): the batch is split in halves, each half
  its own transaction, until the row stands alone; the rows beside it are written;
- suspect (a size limit, 54xxx, or a class we do not know): split the same way, but the
  lone row is only blamed when the attempt *proved the database writable* (a neighbour,
  or another batch since this job's previous attempt, was written). Otherwise the
  records fail transiently and the job backs off, like a systemic error. While nothing
  is proven, the split gives up after a few failed statements (``2 x depth + 2``), so a
  systemic error of an unknown class costs a handful of statements, not ``2n - 1``.

The writer also says whether PostgreSQL is *writable* (:meth:`Writer.writable`): no
write failing, no probe failing (:meth:`Writer.probe`, a zero-row INSERT with a lock
timeout, which a ``SELECT 1`` is not), and no write waiting longer than ``STALL_S`` (a
lock, a server that stopped answering). Nothing is claimed while it is not (rule 14).

Metrics (decided here): ``records_written_total{status}`` counts every settled
outcome of a write attempt, i.e. ``inserted``, ``duplicate``, and ``failed`` for
rows the database rejected. Transient failures are not counted as ``failed``
(the records stay pending and come back); they show in
``postgres_errors_total``, which grows by one per write attempt that hit any
database error (one per attempt, however many halves a split tried). A failed
ping() is not counted here: its caller counts it (core.monitor does).
"""

from __future__ import annotations

import io
import itertools
import logging
import operator
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from concurrent.futures import Future
from dataclasses import dataclass
from datetime import datetime, timezone
from queue import Empty, SimpleQueue
from typing import Any

import orjson
import psycopg2
import psycopg2.extras

from . import db
from .errors import RowRejectedError, SuspectRowError, TransientError
from .metrics import Metrics
from .redact import redact
from .types import DUPLICATE, INSERTED, Record, WriteResult, WriteStatus

log = logging.getLogger(__name__)

# Batches of at least this many records go through COPY. Measured with
# bench/micro_writer.py (PostgreSQL 15, 2 shared CPUs, ~280-byte rows): the paths
# break even at about 20 rows (COPY/VALUES 0.83 at 10, 1.0-1.1 at 20, 1.4 at 50,
# 2-2.5 from 250 up). Below it, COPY's extra round trip and the staging table's
# truncation at commit cost more than the per-value quoting of VALUES saves.
COPY_THRESHOLD = 20
# How often a retry pause looks at the external stop event (cancel_retries is immediate).
STOP_POLL_S = 0.1
# After close()'s deadline: how long cancelled jobs get to hand back their results.
ABORT_GRACE_S = 0.5
# A cancel's own connection and statement give up after this long (a server that stopped answering).
CANCEL_TIMEOUT_S = 2
# A write attempt running longer than this means PostgreSQL is not writable right now
# (a lock wait, a server that stopped answering): a batch normally takes well under a second.
STALL_S = 5.0

# After a direct COPY failed (a duplicate, a refused row), large batches go through
# staging for this long before the direct way is tried again.
DIRECT_COPY_REST_S = 10.0

COLUMNS = ("device_id, ts, latitude, longitude, altitude, angle, speed, satellites, priority, "
           "event_id, attributes")
CONFLICT = "ON CONFLICT (device_id, ts) DO NOTHING RETURNING device_id, ts"
VALUES_SQL = f"INSERT INTO positions ({COLUMNS}) VALUES %s {CONFLICT}"
COPY_SQL = "COPY positions_stage FROM STDIN"
DIRECT_COPY_SQL = f"COPY positions ({COLUMNS}) FROM STDIN"
FROM_STAGE_SQL = f"INSERT INTO positions ({COLUMNS}) SELECT {COLUMNS} FROM positions_stage ORDER BY seq {CONFLICT}"
# Run once per connection. The staging table has the column types of positions
# (so COPY converts values once) but none of its constraints: a bad row fails in
# the INSERT, with the same message as the VALUES path. UTC makes naive and
# aware timestamps mean the same on both paths.
SESSION_SQL = """
SET TIME ZONE 'UTC';
CREATE TEMP TABLE IF NOT EXISTS positions_stage (
    seq         integer NOT NULL,
    device_id   text,
    ts          timestamptz,
    latitude    double precision,
    longitude   double precision,
    altitude    real,
    angle       real,
    speed       real,
    satellites  smallint,
    priority    smallint,
    event_id    integer,
    attributes  jsonb
) ON COMMIT DELETE ROWS;
"""
# The writability probe: an INSERT that stores nothing still needs the INSERT privilege,
# a writable server (25006 otherwise) and the table's ROW EXCLUSIVE lock, which it waits for
# at most PROBE_LOCK_TIMEOUT; it fires no row trigger. Rolled back all the same.
PROBE_LOCK_TIMEOUT = "1s"
PROBE_SQL = (f"SET LOCAL lock_timeout = '{PROBE_LOCK_TIMEOUT}'; SET LOCAL statement_timeout = '5s'; "
             "INSERT INTO positions (device_id, ts, latitude, longitude) "
             "SELECT NULL::text, NULL::timestamptz, NULL::float8, NULL::float8 WHERE false")


class _NotAllStored(Exception):
    """A direct COPY stored fewer rows than it was given (a trigger skipped some; the rest are committed)."""


@dataclass(slots=True)
class _Job:
    """One submit(): its records, its future, and the cancel_retries() generation it belongs to."""

    records: list[Record]
    future: Future[list[WriteResult]]
    generation: int


@dataclass(slots=True)
class _Split:
    """Book-keeping of one attempt's splitting (see the module docstring on suspect errors)."""

    proven: bool  # the database wrote something: a lone suspect row is then the row's own fault
    budget: int  # failed statements allowed while nothing is proven
    failures: int = 0
    suspects: dict[int, str] | None = None  # index -> message of the rows that failed alone, suspect


class _Unproven(Exception):
    """Suspect failures everywhere the split looked, and nothing written: systemic after all."""


class Writer:
    """Writes batches of records to ``positions``; one psycopg2 connection per thread.

    ``write()`` makes one attempt in the caller's thread. ``submit()`` hands the
    batch to one of ``threads`` worker threads, which retries transient failures
    with exponential backoff until they clear, ``stop`` is set, or
    ``cancel_retries()``/``close()`` interrupts it.
    """

    def __init__(self, *, dsn: str, threads: int = 2, metrics: Metrics | None = None,
                 copy_threshold: int = COPY_THRESHOLD, backoff_start: float = db.BACKOFF_START_S,
                 backoff_max: float = db.BACKOFF_MAX_S, stop: threading.Event | None = None) -> None:
        if threads < 1:
            raise ValueError("threads must be at least 1")
        self._dsn = dsn
        self._threads = threads
        self._metrics = metrics
        self._copy_threshold = copy_threshold
        self._backoff_start = backoff_start
        self._backoff_max = backoff_max
        self._stop = stop if stop is not None else threading.Event()
        self._local = threading.local()
        self._conns: dict[threading.Thread, Any] = {}  # every open connection, for close()
        self._lock = threading.Lock()  # guards _conns, _workers, _closing, _started
        self._workers: list[threading.Thread] = []
        self._worker_ids = itertools.count(1)
        self._queue: SimpleQueue[_Job | None] = SimpleQueue()
        self._started = self._closing = self._closed = self._aborting = False
        # cancel_retries() bumps the generation; jobs of older generations stop retrying.
        self._generation = 0
        self._cancel = threading.Condition()
        self._unfinished = 0  # submitted jobs whose future is not resolved yet
        self._idle = threading.Condition()
        self._direct_rest_until = 0.0  # monotonic; the direct COPY is not tried before it
        # Why PostgreSQL is not writable: the last write attempt's systemic failure (None once a
        # write succeeds) and the last probe's (None once a probe succeeds).
        self._write_error: str | None = None
        self._probe_error: str | None = "no PostgreSQL write or probe yet"
        self._busy: dict[int, float] = {}  # thread id -> monotonic start of its running attempt
        self._commits = 0  # statements committed, by every thread: proves the database writable
        # The last record inserted: a known-good neighbour for a row that fails alone (see _neighbour_written).
        self._last_good: Record | None = None
        self._last_success = 0.0

    # --- state for /readyz -------------------------------------------------------------

    @property
    def healthy(self) -> bool:
        """True when neither the last write attempt nor the last probe failed."""
        return self._write_error is None and self._probe_error is None

    @property
    def last_error(self) -> str | None:
        """Why the last write attempt or probe failed (redacted), None when both succeeded."""
        return self._write_error or self._probe_error

    def stalled_for(self) -> float:
        """Seconds the longest-running write attempt has been running (0.0 when none runs)."""
        started = list(self._busy.values())
        return max(time.monotonic() - min(started), 0.0) if started else 0.0

    def writable(self) -> tuple[bool, str]:
        """Whether PostgreSQL accepts writes now, and if not why (CONTRACT 4 rule 14).

        Not writable while the last write attempt or probe failed, or while a write has
        been waiting longer than ``STALL_S`` (a lock, a server that stopped answering):
        nothing may be claimed then, since claimed entries could not be written either.
        """
        error = self.last_error
        if error is not None:
            return False, error
        stalled = self.stalled_for()
        if stalled > STALL_S:
            return False, (f"a write has been waiting {stalled:.0f}s (a lock on positions, or a server "
                           "that stopped answering)")
        return True, "ok"

    @property
    def last_success(self) -> float:
        """``time.time()`` of the last commit (0.0 before the first)."""
        return self._last_success

    # --- public API ----------------------------------------------------------------------

    def start(self) -> None:
        """Start the worker threads; each opens its connection on its first batch."""
        with self._lock:
            if self._started:
                return
            if self._closing:
                raise RuntimeError("writer is closed")
            self._started = True
            for _ in range(self._threads):
                self._spawn_worker()

    def write(self, records: Sequence[Record]) -> list[WriteResult]:
        """One attempt, in the caller's thread: one result per record, in order."""
        if self._closed:
            raise RuntimeError("writer is closed")
        results, reason = self._attempt(records)
        if reason is not None:
            log.warning("PostgreSQL write failed, %d of %d records not written: %s",
                        _transient_count(results), len(results), reason)
        return results

    def submit(self, records: Sequence[Record]) -> Future[list[WriteResult]]:
        """Queue a batch for a worker thread; the future resolves with the per-record results."""
        self.start()
        future: Future[list[WriteResult]] = Future()
        with self._lock:
            if self._closing:
                raise RuntimeError("writer is closed")
            with self._idle:
                self._unfinished += 1
            self._queue.put(_Job(list(records), future, self._generation))
        return future

    def probe(self) -> None:
        """Can ``positions`` be written now? A zero-row INSERT on this thread's connection, which
        needs what a real write needs (the privilege, a writable server, the table's lock within
        ``PROBE_LOCK_TIMEOUT``) and stores nothing. TransientError, with the reason, when not."""
        if self._closed:
            raise RuntimeError("writer is closed")
        ident = threading.get_ident()
        self._busy[ident] = time.monotonic()
        try:
            conn = self._connection()
            with conn.cursor() as cur:
                try:
                    cur.execute(PROBE_SQL)
                finally:
                    _quietly(conn.rollback)
        except (psycopg2.Error, TransientError) as exc:
            reason = str(exc) if isinstance(exc, TransientError) else _probe_message(exc)
            self._discard_connection()
            self._probe_error = reason
            raise TransientError(reason) from exc
        finally:
            self._busy.pop(ident, None)
        self._probe_error = None

    ping = probe  # the name /readyz's monitor knew it by

    def cancel_retries(self) -> None:
        """Jobs already submitted stop retrying and return their transient failures."""
        with self._cancel:
            self._generation += 1
            self._cancel.notify_all()

    def close(self, timeout: float) -> bool:
        """Stop accepting, let queued and running jobs finish for up to ``timeout`` seconds,
        then interrupt what is left and close every connection. True if all jobs finished in time.
        """
        deadline = time.monotonic() + timeout
        with self._lock:
            self._closing = True  # 1. no new jobs
        finished = self._wait_idle(deadline)  # 2. queued and running jobs finish
        if not finished:
            self._abort()  # 3. past the deadline: no retries, statements cancelled
        stuck = self._stop_workers(max(deadline, time.monotonic()) + ABORT_GRACE_S)  # 4. workers exit
        self._fail_queued("writer closed before the batch was written")  # 5. jobs nobody took
        for _ in stuck:
            self._queue.put(None)  # their markers went with the queue: a stuck worker still ends
        self._close_connections(keep=stuck)  # 6. what is left (callers' threads)
        self._closed = True
        return finished

    # --- one attempt ---------------------------------------------------------------------

    def _attempt(self, records: Sequence[Record], *, proven: bool = False) -> tuple[list[WriteResult], str | None]:
        """Write once; returns the results and, if the attempt failed transiently, why.

        ``proven``: the database wrote other rows since this batch's previous attempt, so a
        row that fails alone with a suspect error is that row's fault even with no neighbour
        written in this attempt.
        """
        batch = list(records)
        if not batch:
            return [], None
        started = time.perf_counter()
        settled: list[WriteResult | None] = [None] * len(batch)
        split = _Split(proven=proven, budget=2 * len(batch).bit_length() + 2)
        reason: str | None = None
        ident = threading.get_ident()
        self._busy[ident] = time.monotonic()
        try:
            self._settle(self._connection(), batch, 0, len(batch), settled, split)
        except TransientError as exc:
            reason = str(exc)
            self._discard_connection()
        except _Unproven as exc:
            reason = str(exc)
        finally:
            self._busy.pop(ident, None)
        if split.suspects and not split.proven and reason is None:
            reason = self._neighbour_written(split)
        reason = self._judge_suspects(batch, settled, split, reason)
        results = _fill_unsettled(settled, reason)
        self._account(results, reason, time.perf_counter() - started)
        return results, reason

    def _settle(self, conn: Any, batch: list[Record], lo: int, hi: int,
                settled: list[WriteResult | None], split: _Split) -> None:
        """Write ``batch[lo:hi]``; on a refused row, split in halves until it stands alone."""
        try:
            settled[lo:hi] = self._insert(conn, batch[lo:hi])
            split.proven = True
            return
        except RowRejectedError as exc:
            if hi - lo == 1:
                settled[lo] = WriteResult(WriteStatus.FAILED, transient=False, error=str(exc))
                log.warning("row rejected by PostgreSQL, entry %s: %s", batch[lo].entry_id, exc)
                return
        except SuspectRowError as exc:
            if not split.proven:
                split.failures += 1
                if split.failures > split.budget:
                    raise _Unproven(f"{exc} (on every part of the batch tried, and nothing written)") from exc
            if hi - lo == 1:
                split.suspects = split.suspects or {}
                split.suspects[lo] = str(exc)
                return
        mid = (lo + hi) // 2
        self._settle(conn, batch, lo, mid, settled, split)
        self._settle(conn, batch, mid, hi, settled, split)

    def _neighbour_written(self, split: _Split) -> str | None:
        """Rows failed alone with a suspect error and nothing else was written: is the database
        refusing these rows, or every row? Write a known-good neighbour, the last record inserted,
        in a transaction that is rolled back (its triggers and checks run, nothing is kept). If it
        goes through, the database writes rows: ``split.proven``. A systemic error is returned."""
        neighbour = self._last_good
        if neighbour is None:
            return None  # nothing written since the start yet: stays unproven
        try:
            conn = self._connection()
            with conn.cursor() as cur:
                try:
                    _values_insert(cur, [neighbour])
                finally:
                    _quietly(conn.rollback)
        except psycopg2.Error as exc:
            translated = _translate(exc)
            if isinstance(translated, TransientError):
                self._discard_connection()
                return str(translated)
            return None  # refused too: the database refuses every row, not these
        except (RowRejectedError, ValueError):
            return None
        split.proven = True
        return None

    def _judge_suspects(self, batch: list[Record], settled: list[WriteResult | None], split: _Split,
                        reason: str | None) -> str | None:
        """Rows that failed alone with a suspect error: their own fault if the database was proven
        writable, else left unsettled (transient) with the error as the attempt's reason."""
        if not split.suspects:
            return reason
        if split.proven and reason is None:
            for index, message in split.suspects.items():
                settled[index] = WriteResult(WriteStatus.FAILED, transient=False, error=message)
                log.warning("row refused by PostgreSQL while its neighbours were written, entry %s: %s",
                            batch[index].entry_id, message)
            return None
        return reason or next(iter(split.suspects.values()))

    def _insert(self, conn: Any, batch: list[Record]) -> list[WriteResult]:
        """One transaction; raises TransientError or RowRejectedError (psycopg2 errors translated)."""
        try:
            if len(batch) >= self._copy_threshold and self._direct_copy(conn, batch):
                outcomes = [INSERTED] * len(batch)
            else:
                with _transaction(conn) as cur:
                    if len(batch) >= self._copy_threshold:
                        returned = _copy_insert(cur, batch)
                    else:
                        returned = _values_insert(cur, batch)
                outcomes = _outcomes(batch, returned)
        except psycopg2.Error as exc:
            translated = _translate(exc)
            if translated is None:
                raise  # not a database verdict on the data or the link: a bug of ours
            raise translated from exc
        except orjson.JSONEncodeError as exc:
            # attributes orjson cannot encode (an integer past 64 bits): that row's own fault
            raise RowRejectedError(f"attributes cannot be encoded as JSON: {exc}") from exc
        with self._lock:
            self._commits += 1
        self._last_success = time.time()
        self._last_good = batch[-1]
        if self._metrics is not None:
            self._metrics.last_write_timestamp.set(self._last_success)
        return outcomes

    def _direct_copy(self, conn: Any, batch: list[Record]) -> bool:
        """COPY the batch straight into positions, one statement in autocommit; True if every row was stored.

        False when a row conflicts or is refused (nothing stored), or a trigger skipped
        one (the others stored): the caller then writes the batch through staging. A
        transient failure raises, as on the other paths.
        """
        if time.monotonic() < self._direct_rest_until:
            return False
        data = _copy_text_rows(batch)
        if data is None:
            data = _copy_text(batch, numbered=False)
        try:
            if _autocommit_copy(conn, data) != len(batch):
                raise _NotAllStored()
        except (psycopg2.Error, _NotAllStored) as exc:
            if isinstance(exc, psycopg2.Error) and db.classify(exc) not in (db.Verdict.ROW, db.Verdict.SUSPECT):
                raise  # systemic (or a bug): handled by the caller as on the staging path
            self._direct_rest_until = time.monotonic() + DIRECT_COPY_REST_S
            log.debug("direct COPY of %d rows not possible (%s); writing them through staging",
                      len(batch), _row_message(exc) if isinstance(exc, psycopg2.Error) else "rows skipped")
            return False
        return True

    def _account(self, results: list[WriteResult], reason: str | None, seconds: float) -> None:
        """Health, metrics and the per-batch debug line for one attempt."""
        inserted = results.count(INSERTED)  # identity first: C speed while all are the singleton
        if inserted == len(results):
            duplicates = rejected = 0
        else:
            inserted = sum(1 for r in results if r is INSERTED)
            duplicates = sum(1 for r in results if r is DUPLICATE)
            rejected = len(results) - inserted - duplicates - _transient_count(results)
        self._write_error = reason
        if reason is None:
            self._probe_error = None  # a write that went through says more than any probe
        m = self._metrics
        if m is not None:
            m.batch_write_seconds.observe(seconds)
            m.records_written.labels("inserted").inc(inserted)
            m.records_written.labels("duplicate").inc(duplicates)
            m.records_written.labels("failed").inc(rejected)
            if reason is not None or rejected:
                m.postgres_errors.inc()
        log.debug("batch written inserted=%d duplicates=%d failed=%d", inserted, duplicates,
                  len(results) - inserted - duplicates)

    # --- connections (one per thread, created in that thread) ----------------------------

    def _connection(self) -> Any:
        conn = getattr(self._local, "conn", None)
        if conn is not None and not conn.closed:
            return conn
        conn = _open(self._dsn)
        self._local.conn = conn
        with self._lock:
            self._reap_dead_threads()
            self._conns[threading.current_thread()] = conn
        return conn

    def _discard_connection(self) -> None:
        """Close this thread's connection: never reused after an error."""
        conn = getattr(self._local, "conn", None)
        self._local.conn = None
        with self._lock:
            self._conns.pop(threading.current_thread(), None)
        if conn is not None:
            _close_quietly(conn)

    def _reap_dead_threads(self) -> None:
        """Close the connections of threads that ended (callers of write() come and go)."""
        for thread in [t for t in self._conns if not t.is_alive()]:
            _close_quietly(self._conns.pop(thread))

    def _close_connections(self, keep: Sequence[threading.Thread] = ()) -> None:
        """Close every connection but those of ``keep`` and of threads inside a statement: such a
        thread holds its connection's lock, and close() would wait on it (the daemon thread dies
        with the process).
        """
        busy = set(self._busy)
        with self._lock:
            kept = {t for t in self._conns if t in keep or (t.ident in busy and t.is_alive())}
            conns = [c for t, c in self._conns.items() if t not in kept]
            self._conns = {t: c for t, c in self._conns.items() if t in kept}
        for conn in conns:
            _close_quietly(conn)

    # --- worker threads ------------------------------------------------------------------

    def _spawn_worker(self) -> None:
        """Start one worker thread (caller holds ``_lock``)."""
        thread = threading.Thread(target=self._work, name=f"writer-{next(self._worker_ids)}", daemon=True)
        self._workers.append(thread)
        thread.start()

    def _work(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                break
            if not self._run_job(job):
                return  # this thread died; a replacement has been started
        self._discard_connection()

    def _run_job(self, job: _Job) -> bool:
        """Run one job and resolve its future; False if it blew up (the thread is replaced)."""
        if not job.future.set_running_or_notify_cancel():
            self._job_done()
            return True
        try:
            results = self._with_retries(job)
        except BaseException as exc:  # noqa: BLE001 - a bug of ours: report it, keep the pool whole
            log.exception("writer thread died on a batch of %d records; starting a new one", len(job.records))
            job.future.set_exception(exc)
            self._job_done()
            self._discard_connection()
            self._replace_worker()
            return False
        job.future.set_result(results)
        self._job_done()
        return True

    def _replace_worker(self) -> None:
        with self._lock:
            self._workers.remove(threading.current_thread())
            if not self._aborting:
                self._spawn_worker()

    def _stop_workers(self, until: float) -> list[threading.Thread]:
        """Send every worker the end-of-work marker and join them; returns those still running."""
        with self._lock:
            workers = list(self._workers)
        for _ in workers:
            self._queue.put(None)
        for worker in workers:
            worker.join(max(0.0, until - time.monotonic()))
        stuck = [w for w in workers if w.is_alive()]
        if stuck:
            log.warning("writer: %d threads still busy after close; left to end with the process", len(stuck))
        return stuck

    def _with_retries(self, job: _Job) -> list[WriteResult]:
        """Write the job's records; retry the transient failures with backoff until interrupted."""
        if self._aborting:
            return _all_transient(job.records, "writer closed before the batch was written")
        results, reason = self._attempt(job.records)
        commits_seen = self._commits
        delay, attempt = self._backoff_start, 1
        while reason is not None:
            if self._interrupted(job):
                log.warning("PostgreSQL write failed (attempt %d), %d records left pending: %s",
                            attempt, _transient_count(results), reason)
                return results
            log.warning("PostgreSQL write failed (attempt %d), retrying %d records in %.1fs: %s",
                        attempt, _transient_count(results), delay, reason)
            if not self._pause(delay, job):
                return results
            proven = self._commits > commits_seen  # other batches were written meanwhile
            results, reason = self._retry_transient(job.records, results, proven=proven)
            commits_seen = self._commits
            delay, attempt = min(delay * 2, self._backoff_max), attempt + 1
        return results

    def _retry_transient(self, records: list[Record], results: list[WriteResult], *, proven: bool = False
                         ) -> tuple[list[WriteResult], str | None]:
        """One more attempt for the records that failed transiently; the others keep their result."""
        again = [i for i, r in enumerate(results) if r.transient]
        retried, reason = self._attempt([records[i] for i in again], proven=proven)
        merged = list(results)
        for i, result in zip(again, retried):
            merged[i] = result
        return merged, reason

    def _interrupted(self, job: _Job) -> bool:
        return self._aborting or self._stop.is_set() or job.generation != self._generation

    def _pause(self, seconds: float, job: _Job) -> bool:
        """Sleep before a retry; False as soon as the job is interrupted."""
        end = time.monotonic() + seconds
        with self._cancel:
            while not self._interrupted(job):
                remaining = end - time.monotonic()
                if remaining <= 0:
                    return True
                self._cancel.wait(min(remaining, STOP_POLL_S))
        return False

    # --- close() -------------------------------------------------------------------------

    def _job_done(self) -> None:
        with self._idle:
            self._unfinished -= 1
            self._idle.notify_all()

    def _wait_idle(self, deadline: float) -> bool:
        with self._idle:
            while self._unfinished > 0:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._idle.wait(remaining)
        return True

    def _abort(self) -> None:
        """Past the deadline: no more attempts, no more retries, running statements cancelled."""
        log.warning("writer: %d batches still unfinished at the close deadline; cancelling them",
                    self._unfinished)
        self._aborting = True
        self.cancel_retries()
        with self._lock:
            conns = list(self._conns.values())
        for conn in conns:
            # Not conn.cancel(): libpq's cancel request waits for the server with no timeout, and
            # psycopg2 holds the GIL meanwhile, so a server that stopped answering would freeze
            # the whole process (signals included). pg_cancel_backend() from a connection of its
            # own, with timeouts, in a daemon thread, reaches the same backend (same host, pid).
            threading.Thread(target=_cancel_backend, args=(self._dsn, conn), name="writer-cancel",
                             daemon=True).start()

    def _fail_queued(self, reason: str) -> None:
        """Resolve jobs that no worker took (workers stuck past the deadline) as transient failures."""
        while True:
            try:
                job = self._queue.get_nowait()
            except Empty:
                return
            if job is None:
                continue
            if job.future.set_running_or_notify_cancel():
                job.future.set_result(_all_transient(job.records, reason))
            self._job_done()


# --- the two insert paths ----------------------------------------------------------------

def _values_insert(cur: Any, batch: list[Record]) -> list[tuple[str, datetime]]:
    """Small batches: one ``INSERT ... VALUES (...), (...)`` statement."""
    dumps = orjson.dumps
    rows = [(p.device_id, p.ts, p.latitude, p.longitude, p.altitude, p.angle, p.speed, p.satellites,
             p.priority, p.event_id, dumps(p.attributes).decode() if p.attributes else "{}")
            for p in [r.position for r in batch]]
    try:
        returned: list[tuple[str, datetime]] = psycopg2.extras.execute_values(
            cur, VALUES_SQL, rows, page_size=len(rows), fetch=True)
    except ValueError as exc:
        # psycopg2 refuses to quote a string holding NUL; COPY fails the same row on the server.
        raise RowRejectedError(str(exc)) from exc
    return returned


def _copy_insert(cur: Any, batch: list[Record]) -> list[tuple[str, datetime]]:
    """Large batches: COPY into the staging table, then one ``INSERT ... SELECT`` in batch order."""
    data = _copy_text(batch)
    cur.copy_expert(COPY_SQL, io.BytesIO(data), size=max(len(data), 1))
    cur.execute(FROM_STAGE_SQL)
    returned: list[tuple[str, datetime]] = cur.fetchall()
    return returned


def _copy_text(batch: list[Record], numbered: bool = True) -> bytes:
    """The batch in COPY text format: tab-separated, ``\\N`` for NULL, backslash escapes;
    each line starts with its position in the batch (the staging table's ``seq``) if ``numbered``.

    Hot and Python-bound, so it is one loop with everything inlined: device ids
    are nearly always IMEIs (``isalnum`` skips escaping them), floats go out by
    ``repr`` (exact round trip), and orjson's JSON never holds a raw tab, newline
    or carriage return, so attributes only need their backslashes doubled.
    """
    dumps = orjson.dumps
    null = "\\N"
    lines: list[str] = []
    append = lines.append
    for seq, record in enumerate(batch):
        p = record.position
        device = p.device_id
        if not device.isalnum():
            device = _escape(device)
        attrs = dumps(p.attributes).decode() if p.attributes else "{}"
        if "\\" in attrs:
            attrs = attrs.replace("\\", "\\\\")
        altitude, angle, speed = p.altitude, p.angle, p.speed
        satellites, priority, event_id = p.satellites, p.priority, p.event_id
        line = (f"{device}\t{p.ts.isoformat()}\t{p.latitude!r}\t{p.longitude!r}\t"
                f"{null if altitude is None else repr(altitude)}\t"
                f"{null if angle is None else repr(angle)}\t"
                f"{null if speed is None else repr(speed)}\t"
                f"{null if satellites is None else satellites}\t"
                f"{null if priority is None else priority}\t"
                f"{null if event_id is None else event_id}\t{attrs}\n")
        append(f"{seq}\t{line}" if numbered else line)
    return "".join(lines).encode()


def _copy_text_rows(batch: list[Record]) -> bytes | None:
    """The direct COPY's text: the rows the decoder's compiled way made, joined, when every record
    has one (the usual batch); else :func:`_copy_text_fast`'s. None: use :func:`_copy_text`."""
    rows = list(map(_ROW, batch))
    if None not in rows:
        return b"".join(rows)
    return _copy_text_fast(batch)


def _copy_text_fast(batch: list[Record]) -> bytes | None:
    """The direct COPY's text (no ``seq``), as :func:`_copy_text` makes it, in about 60% of the time;
    None when the batch holds something this way could get wrong (then use _copy_text).

    orjson formats the ten scalar columns of every row in one call: its floats are the
    shortest round-trip decimals, digit for digit those of ``repr`` (at most the
    notation differs, 1e-05 against 0.00001: the same decimal number); its datetimes are
    ``isoformat()``'s text; its integers are ``str()``'s. The JSON is then turned into
    COPY text by replacing ``,null`` with ``\\N``, dropping the quotes and turning commas
    into tabs, which is exact only for what is checked first: device ids that are
    alphanumeric (no quote, comma, backslash or control character), datetimes that are
    UTC or naive, and numbers that are plain ints, floats or None and finite (orjson
    writes NaN and infinity as null: the null count must be the None count).
    """
    dumps = orjson.dumps
    positions = list(map(_POSITION, batch))
    try:
        if not all(map(str.isalnum, map(_DEVICE, positions))):
            return None
        stamps = list(map(_TS, positions))
        if set(map(type, stamps)) != {datetime} or not _FAST_ZONES.issuperset(map(_TZINFO, stamps)):
            return None
        # The numbers' types, then their Nones (none at all in most batches), each one C-level pass
        # without a list of the batch's 8,000 numbers: 0.96 -> 0.36 us a row.
        types = set(map(type, itertools.chain.from_iterable(map(_NUMBERS, positions))))
        if not _FAST_NUMBERS.issuperset(types):
            return None
        nones = operator.countOf(itertools.chain.from_iterable(map(_NUMBERS, positions)), None) \
            if _NONE_TYPE in types else 0
        text = dumps(list(map(_SCALARS, positions)))
    except TypeError:  # a device id that is not a str; an integer past 64 bits (JSONEncodeError)
        return None
    if text.count(b",null") != nones:
        return None  # NaN or infinity somewhere
    rows = text[2:-2].replace(b",null", b",\\N").replace(b'"', b"").replace(b",", b"\t").split(b"]\t[")
    inner = _attributes_inner(positions)
    if inner is None or len(inner) != len(rows):  # attributes not cut apart exactly (rare): a dumps() a row
        attrs = [dumps(a) if a else b"{}" for a in map(_ATTRIBUTES, positions)]
        return b"".join([row + b"\t" + (a.replace(b"\\", b"\\\\") if b"\\" in a else a) + b"\n"
                         for row, a in zip(rows, attrs)])
    # row, "\t{", the attributes' inside, "}\n" for every row, joined in C
    return b"".join(itertools.chain.from_iterable(zip(rows, _OPEN, inner, _CLOSE)))


def _attributes_inner(positions: list[Any]) -> list[bytes] | None:
    """Each row's attributes as COPY text without the outer braces, from one ``dumps`` of the whole
    batch's list; None when that list cannot be cut apart exactly.

    ``[{...},{...}]`` is cut at ``},{``. That is exact when the text holds ``},{`` exactly
    once per boundary (len - 1 times): anywhere else (an array of objects, a string holding
    it) it would be one more. orjson's JSON holds no raw tab, newline or carriage return, so
    COPY text only needs its backslashes doubled, for the whole batch at once.
    """
    attributes = list(map(_ATTRIBUTES, positions))
    if None in attributes:
        attributes = [a if a is not None else _NO_ATTRIBUTES for a in attributes]
    text = orjson.dumps(attributes)
    if text.count(b"},{") != len(attributes) - 1 or not text.startswith(b"[{") or not text.endswith(b"}]"):
        return None  # "[]" (an empty batch), a bracket or boundary inside the values
    if b"\\" in text:
        text = text.replace(b"\\", b"\\\\")
    return text[2:-2].split(b"},{")


_POSITION = operator.itemgetter(1)  # Record.position
_ROW = operator.itemgetter(4)  # Record.row
_DEVICE = operator.itemgetter(0)  # Position.device_id
_TS = operator.itemgetter(1)  # Position.ts
_NUMBERS = operator.itemgetter(slice(2, 10))  # latitude .. event_id
_SCALARS = operator.itemgetter(slice(0, 10))  # device_id .. event_id
_ATTRIBUTES = operator.itemgetter(10)
_TZINFO = operator.attrgetter("tzinfo")
_FAST_ZONES = frozenset((timezone.utc, None))
_FAST_NUMBERS = frozenset((int, float, type(None)))
_NONE_TYPE = type(None)
_OPEN = itertools.repeat(b"\t{")
_CLOSE = itertools.repeat(b"}\n")
_NO_ATTRIBUTES: dict[str, Any] = {}  # never changed: None is stored as {}


def _escape(text: str) -> str:
    """A value for COPY text format: backslash, tab, newline and carriage return escaped."""
    return text.replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n").replace("\r", "\\r")


def _outcomes(batch: list[Record], returned: list[tuple[str, datetime]]) -> list[WriteResult]:
    """INSERTED for the records whose key came back from RETURNING, DUPLICATE for the others.

    When every record came back, all are new: a key twice in the batch would
    have returned fewer rows, so no per-row mapping is needed.
    """
    if len(returned) == len(batch):
        return [INSERTED] * len(batch)
    inserted = set(returned)
    results = []
    for record in batch:
        key = (record.position.device_id, _as_utc(record.position.ts))
        if key in inserted:
            inserted.discard(key)  # a later record with the same key is the duplicate
            results.append(INSERTED)
        else:
            results.append(DUPLICATE)
    return results


def _as_utc(ts: datetime) -> datetime:
    """Naive timestamps are stored as UTC (the session time zone): compare them so."""
    return ts if ts.tzinfo is not None else ts.replace(tzinfo=timezone.utc)


# --- helpers -----------------------------------------------------------------------------

def _open(dsn: str) -> Any:
    """A new connection with its session set up (time zone, staging table); TransientError if not."""
    conn = db.connect(dsn)
    try:
        with _transaction(conn) as cur:
            cur.execute(SESSION_SQL)
    except psycopg2.Error as exc:
        _close_quietly(conn)
        raise TransientError(db.describe(exc)) from exc
    log.debug("writer connection opened in %s", threading.current_thread().name)
    return conn


def _autocommit_copy(conn: Any, data: bytes) -> int:
    """The direct COPY as a statement of its own, committed by the server as it ends; the rows stored.

    One round trip instead of three (BEGIN, COPY, COMMIT): each is a wake-up of this thread,
    which then waits for the GIL the main thread holds while it decodes. A single statement
    is atomic all the same: it stores every row or none (docs/performance.md, round 4).
    """
    conn.autocommit = True  # psycopg2 sends nothing for this: it only stops sending BEGIN
    try:
        with conn.cursor() as cur:
            cur.copy_expert(DIRECT_COPY_SQL, io.BytesIO(data), size=max(len(data), 1))
            return int(cur.rowcount)
    finally:
        if not conn.closed:
            conn.autocommit = False


@contextmanager
def _transaction(conn: Any) -> Iterator[Any]:
    """A cursor in a transaction: commit on success, roll back on error, cursor closed.

    Unlike ``with conn:``, a rollback that fails (the connection is gone) does not
    hide the error that caused it: that one is what gets classified and reported.
    """
    cur = conn.cursor()
    try:
        yield cur
        cur.close()
        conn.commit()
    except BaseException:
        _quietly(cur.close)
        _quietly(conn.rollback)
        raise


def _translate(exc: psycopg2.Error) -> TransientError | RowRejectedError | SuspectRowError | None:
    """Our error for a psycopg2 one; None when it is no database verdict (then it is a bug of ours)."""
    verdict = db.classify(exc)
    if verdict is db.Verdict.SYSTEMIC:
        return TransientError(db.describe(exc))
    if verdict is db.Verdict.ROW:
        return RowRejectedError(_row_message(exc))
    if verdict is db.Verdict.SUSPECT:
        return SuspectRowError(_coded_message(exc))
    return None


def _coded_message(exc: psycopg2.Error) -> str:
    """The database's message with its SQLSTATE: for errors we do not know, the code is the clue."""
    code = getattr(exc, "pgcode", None)
    return f"{_row_message(exc)} (SQLSTATE {code})" if code else _row_message(exc)


def _probe_message(exc: psycopg2.Error) -> str:
    if getattr(exc, "pgcode", None) == "55P03":
        return f"positions is locked by another session (no lock within {PROBE_LOCK_TIMEOUT})"
    return db.describe(exc)


def _row_message(exc: psycopg2.Error) -> str:
    """The database's one-line message (names the constraint for a check violation)."""
    diag = getattr(exc, "diag", None)
    primary = getattr(diag, "message_primary", None)
    return redact(" ".join(primary.split())) if primary else db.describe(exc)


def _close_quietly(conn: Any) -> None:
    _quietly(conn.close)


def _cancel_backend(dsn: str, conn: Any) -> None:
    """Cancel ``conn``'s running statement (it then fails with 57014) through a new connection to
    the same server; gives up quietly after CANCEL_TIMEOUT_S (the statement goes on: the stop
    sequence does not wait for it)."""
    try:
        host, port, pid = conn.info.host, conn.info.port, conn.get_backend_pid()
        canceller = psycopg2.connect(dsn, host=host, port=port, connect_timeout=CANCEL_TIMEOUT_S,
                                     target_session_attrs="any", application_name="telemetry-processor-cancel")
    except (psycopg2.Error, AttributeError) as exc:
        log.debug("cancel not sent: %s", db.describe(exc))
        return
    try:
        canceller.autocommit = True
        with canceller.cursor() as cur:
            cur.execute("SELECT set_config('statement_timeout', %s, false)", (str(CANCEL_TIMEOUT_S * 1000),))
            cur.execute("SELECT pg_cancel_backend(%s)", (pid,))
    except psycopg2.Error as exc:
        log.debug("cancel of backend %s failed: %s", pid, db.describe(exc))
    finally:
        _close_quietly(canceller)


def _quietly(action: Callable[[], object]) -> None:
    """Clean-up on a connection that may already be broken: its error would only hide the real one."""
    try:
        action()
    except psycopg2.Error:
        pass


def _fill_unsettled(settled: list[WriteResult | None], reason: str | None) -> list[WriteResult]:
    """Records a transient failure left unsettled fail with ``transient=True``."""
    if reason is None:
        return settled  # type: ignore[return-value]  # every slot was filled
    failed = WriteResult(WriteStatus.FAILED, transient=True, error=reason)
    return [r if r is not None else failed for r in settled]


def _all_transient(records: Sequence[Record], reason: str) -> list[WriteResult]:
    return [WriteResult(WriteStatus.FAILED, transient=True, error=reason)] * len(records)


def _transient_count(results: list[WriteResult]) -> int:
    return sum(1 for r in results if r.transient)
