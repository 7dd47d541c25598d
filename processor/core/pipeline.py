"""The main loop: read a batch, decode, update state, write, acknowledge what is stored.

One thread (the caller's) reads and acknowledges; the writer's threads write.
While one batch is written the next is read, but never more than
``max_inflight`` batches are unacknowledged: reading pauses at the bound, so
memory stays bounded when PostgreSQL is slow or down.
"""

from __future__ import annotations

import gc
import itertools
import logging
import operator
import sys
import threading
import time
import weakref
from bisect import bisect_left, bisect_right
from collections import deque
from concurrent.futures import FIRST_COMPLETED, Future
from concurrent.futures import wait as wait_futures
from dataclasses import dataclass, field
from typing import Callable, Mapping, Protocol, Sequence

from prometheus_client import Histogram

from .consumer import Entry, StreamConsumer
from .deadletter import DeadLetter, DeadLetters
from .decode import Decoder
from .errors import ProcessorError, StreamGoneError, TransientError
from .health import Health
from .metrics import Metrics
from .state import DeviceState, StateView
from .types import (DB_REJECTED, INSERTED, MAX_DELIVERIES, MISSING_PAYLOAD, Record, Rejection, WriteResult,
                    WriteStatus)

log = logging.getLogger(__name__)

BACKOFF_START_S = 0.5
BACKOFF_MAX_S = 30.0
HEARTBEAT_S = 10.0


class BatchHandler(Protocol):
    """The domain seam: called after each batch is stored, in the main thread.

    Receives the records, their write results (same order) and read-only state.
    An exception is logged and counted; it never holds up acknowledgement.
    """

    def __call__(self, records: Sequence[Record], results: Sequence[WriteResult], state: StateView) -> None: ...


class WriterLike(Protocol):
    def submit(self, records: Sequence[Record]) -> Future[list[WriteResult]]: ...

    def writable(self) -> tuple[bool, str]: ...


@dataclass
class Totals:
    """What this pipeline settled since it started (for replay's summary and the heartbeat)."""

    consumed: int = 0
    inserted: int = 0
    duplicate: int = 0
    failed: int = 0
    dead_lettered: int = 0
    acked: int = 0
    lost: int = 0


# While writes are in flight, reads block at most this long, so that finished batches are
# acknowledged promptly even when the stream is quiet.
SETTLE_POLL_MS = 50


@dataclass
class Batch:
    records: list[Record]
    future: Future[list[WriteResult]]
    read_at: float
    ids: list[str] = field(default_factory=list)
    committed_at: float = 0.0  # wall clock when the writer finished, set from the writer's thread


class Pipeline:
    """Reads from a :class:`StreamConsumer`, writes through the writer, acknowledges what is stored."""

    def __init__(self, *, consumer: StreamConsumer, decoder: Decoder, state: DeviceState, writer: WriterLike,
                 dead_letters: DeadLetters, metrics: Metrics, health: Health, max_inflight: int = 4,
                 max_deliveries: int = 5, reclaim_idle_ms: int = 60_000,
                 handlers: Sequence[BatchHandler] = (), clock: Callable[[], float] = time.time) -> None:
        self.consumer = consumer
        self.decoder = decoder
        self.state = state
        self.writer = writer
        self.dead_letters = dead_letters
        self.metrics = metrics
        self.health = health
        self.max_inflight = max_inflight
        self.max_deliveries = max_deliveries
        self.reclaim_idle_ms = reclaim_idle_ms
        # Reclaim often enough that an idle entry waits at most about 1.5 x RECLAIM_IDLE_MS.
        self.reclaim_every_s = min(max(reclaim_idle_ms / 2000, 0.2), 30.0)
        # Entries held here (in flight, stored but not yet acknowledged, dead letters not yet
        # stored) have their idle time reset this often, a quarter of RECLAIM_IDLE_MS, so that
        # no reclaim (ours, a peer's, replay's) claims them and raises their delivery count.
        self.touch_every_s = max(reclaim_idle_ms / 4000, 0.05)
        self.handlers = list(handlers)
        self.clock = clock
        self.totals = Totals()
        self.inflight: deque[Batch] = deque()
        self._inflight_ids: set[str] = set()
        self._unacked: list[str] = []  # stored or dead-lettered, XACK not yet through
        self._defer_acks = False  # True while turn() settles: acks then go out with its read
        self._transient_failures = 0  # records whose write gave up on a transient error (only when stopping)
        self._next_reclaim = time.monotonic() + self.reclaim_every_s
        self._next_touch = time.monotonic() + self.touch_every_s
        self._reclaim_cursor = "0-0"
        self._reclaim_paused: str | None = None  # why reclaiming waits (PostgreSQL not writable)
        # Dead letters Redis refused to store (OOM, a read-only replica): held and retried with
        # back-off; their entries stay pending meanwhile. Reading pauses while a batch's worth waits.
        self._letters: list[DeadLetter] = []
        self._letters_retry_at = 0.0
        self._letters_backoff = BACKOFF_START_S
        self._redis_backoff = BACKOFF_START_S
        self._last_heartbeat = time.monotonic()
        self._heartbeat_base = 0

    # --- the loop ---

    def run(self, stop: threading.Event) -> None:
        """Turn until ``stop`` is set. Unexpected exceptions propagate (the caller stops gracefully)."""
        tune_gc()
        tune_switching()
        while not stop.is_set():
            self.turn(stop)

    def turn(self, stop: threading.Event) -> None:
        """One turn: settle finished writes, then read (or wait while at the in-flight bound)."""
        self.health.turned()
        self._defer_acks = True  # the acknowledgements of what settles now go with the read below
        try:
            self.settle(block_s=0.0)
        finally:
            self._defer_acks = False
        self._heartbeat()
        self._note_postgres()
        self._keep_fresh()
        self._retry_letters()
        if self._at_bound():
            self._try_flush_acks()
            self.settle(block_s=0.2)
            return
        try:
            if not self.inflight or time.monotonic() >= self._next_reclaim:
                self._flush_acks()  # idle: now, not with a read that may block for BLOCK_MS
            if time.monotonic() >= self._next_reclaim and self._may_claim():
                self.reclaim_once()
            entries = self._read()
            self.health.redis_result(None)
            self._redis_backoff = BACKOFF_START_S
        except StreamGoneError:
            self.metrics.redis_errors.inc()
            self._recover_group()
            return
        except TransientError as exc:
            self._redis_failed(exc, stop)
            return
        if entries:
            self.process(entries)

    def _note_postgres(self) -> None:
        """A failing or stalled write makes the service not ready at once (the monitor's next
        probe would say it within its interval; a successful batch says the opposite)."""
        writable, why = self.writer.writable()
        if not writable:
            self.health.postgres_result(why)

    def _at_bound(self) -> bool:
        """Reading pauses at the in-flight bound, and while a batch's worth of dead letters waits for Redis."""
        return len(self.inflight) >= self.max_inflight or len(self._letters) >= self.consumer.batch_size

    def _redis_failed(self, exc: TransientError, stop: threading.Event) -> None:
        self.metrics.redis_errors.inc()
        self.health.redis_result(str(exc))
        log.warning("Redis unavailable, retrying in %.1fs: %s", self._redis_backoff, exc,
                    extra={"consumer": self.consumer.consumer})
        # Fresh connections for the next try: after a failover the address may lead to the new
        # primary, and a connection to a replica that answers READONLY would stay one.
        self.consumer.reset_connections()
        # Keep settling writes while we wait, so finished batches are acknowledged as soon as Redis is back.
        deadline = time.monotonic() + self._redis_backoff
        while not stop.is_set() and time.monotonic() < deadline:
            self.health.turned()
            self.settle(block_s=min(0.2, max(deadline - time.monotonic(), 0)))
        self._redis_backoff = min(self._redis_backoff * 2, BACKOFF_MAX_S)

    def _recover_group(self) -> None:
        try:
            self.consumer.recover_group()
        except TransientError as exc:
            log.warning("could not recreate the group yet: %s", exc)

    # --- one batch ---

    def process(self, entries: Sequence[Entry]) -> Batch | None:
        """Decode ``entries``, dead-letter what can never be stored, update state and submit the rest."""
        now = self.clock()
        self.metrics.records_consumed.inc(len(entries))
        self.metrics.batch_size.observe(len(entries))
        self.totals.consumed += len(entries)
        log.debug("batch consumed n=%d", len(entries), extra={"consumer": self.consumer.consumer})
        records: list[Record] = []
        letters: list[DeadLetter] = []
        lost: list[str] = []
        # The per-entry work is the hot path: the payloads decoded as one batch (no call per
        # entry), and for the usual batch (nothing in flight here already, every entry with
        # its data, none delivered too often, every one decoded) no Python loop at all:
        # C-level passes build the Records with tuple.__new__ (docs/performance.md).
        max_deliveries = self.max_deliveries
        fieldss: list[Mapping[bytes, bytes]] = list(map(_FIELDS, entries))
        if all(fieldss) and self._inflight_ids.isdisjoint(map(_ENTRY_ID, entries)) \
                and max(map(_DELIVERIES, entries), default=0) <= max_deliveries:
            kept: Sequence[Entry] = entries
        else:
            kept, fieldss = self._screen(entries, letters, lost)
        results, rows = self.decoder.decode_rows(fieldss, now)
        # A row for each entry the compiled way decided: the rest went the Python ways (a payload of an
        # unusual shape, a rejection; all of them where the compiled way was not built).
        compiled = len(rows) - rows.count(None)
        self.metrics.entries_decoded.labels("compiled").inc(compiled)
        self.metrics.entries_decoded.labels("python").inc(len(rows) - compiled)
        if Rejection not in set(map(type, results)):
            try:
                payloads = list(map(_PAYLOAD_OF, fieldss))
            except KeyError:  # a client that decodes responses: str keys, as the decoder tolerates
                payloads = [fields.get(b"payload", b"") for fields in fieldss]
            records = list(map(_new_record, _RECORD, zip(map(_ENTRY_ID, kept), results, payloads,
                                                          map(_DELIVERIES, kept), rows)))
        else:
            append = records.append
            new_record = _new_record
            for (entry_id, _, deliveries), fields, result, row in zip(kept, fieldss, results, rows):
                payload = fields.get(b"payload", b"")
                if type(result) is Rejection:
                    if result.reason == MISSING_PAYLOAD:
                        payload = b""
                    letters.append(DeadLetter(entry_id, payload, result.reason, result.detail, deliveries))
                else:
                    append(new_record(Record, (entry_id, result, payload, deliveries, row)))
        self._settle_unwritable(letters, lost)
        if not records:
            return None
        self.state.update(map(_POSITION, records), now)
        self.metrics.devices_tracked.set(len(self.state))
        batch = Batch(records, self.writer.submit(records), time.monotonic(), list(map(_ENTRY_ID, records)))
        batch.future.add_done_callback(self._committed_callback(batch))
        self._inflight_ids.update(batch.ids)
        self.inflight.append(batch)
        self.metrics.inflight_batches.set(len(self.inflight))
        return batch

    def _screen(self, entries: Sequence[Entry], letters: list[DeadLetter], lost: list[str]
                ) -> tuple[list[Entry], list[Mapping[bytes, bytes]]]:
        """The entries to decode, and their fields; the others skipped (already in flight here),
        noted as lost (their data is gone) or dead-lettered (delivered too often)."""
        inflight_ids = self._inflight_ids  # also holds the ids of dead letters waiting for Redis
        max_deliveries = self.max_deliveries
        kept: list[Entry] = []
        fieldss: list[Mapping[bytes, bytes]] = []
        for entry in entries:
            entry_id, fields, deliveries = entry
            if entry_id in inflight_ids:
                continue  # already being written here (claimed back from ourselves)
            if fields is None:
                lost.append(entry_id)
                continue
            if deliveries > max_deliveries:
                letters.append(DeadLetter(entry_id, fields.get(b"payload", b""), MAX_DELIVERIES,
                                          f"delivered {deliveries} times (limit {max_deliveries})", deliveries))
                continue
            fieldss.append(fields)
            kept.append(entry)
        return kept, fieldss

    def _committed_callback(self, batch: Batch) -> Callable[[Future[list[WriteResult]]], None]:
        """Runs in the writer's thread when the batch is done: note the commit time for end_to_end.

        It holds the batch by a weak reference: a strong one would make a cycle (batch ->
        future -> callback -> batch), and the batch's thousand records would then wait for
        the garbage collector instead of being freed as soon as the batch is settled.
        """
        ref = weakref.ref(batch)
        clock = self.clock

        def done(_future: Future[list[WriteResult]]) -> None:
            settled = ref()
            if settled is not None:
                settled.committed_at = clock()
        return done

    def _settle_unwritable(self, letters: list[DeadLetter], lost: list[str]) -> None:
        """Dead-letter rejections (with their acknowledgement), count lost entries and acknowledge them."""
        for entry_id in lost:
            log.error("pending entry %s has no data (trimmed or deleted): lost, acknowledging it", entry_id,
                      extra={"consumer": self.consumer.consumer})
        if lost:
            self.metrics.entries_lost.inc(len(lost))
            self.totals.lost += len(lost)
        if letters and not self._store_letters(letters):
            # Not acknowledged: held here, retried with back-off, kept fresh (never claimed back).
            self._letters.extend(letters)
            self._inflight_ids.update(d.source_id for d in letters)
        self._ack(lost)

    def _store_letters(self, letters: list[DeadLetter]) -> bool:
        """XADD ``letters`` to the dead-letter stream and acknowledge their entries, in one atomic step;
        False (and not ready) if Redis refused them."""
        try:
            self.dead_letters.add(letters)
        except TransientError as exc:
            self.metrics.redis_errors.inc()
            self.health.problem("dead letters", f"{len(self._letters) + len(letters)} cannot be stored: {exc}")
            log.warning("could not dead-letter %d entries, holding them (still pending) and retrying in %.1fs: %s",
                        len(letters), self._letters_backoff, exc, extra={"consumer": self.consumer.consumer})
            self._letters_retry_at = time.monotonic() + self._letters_backoff
            self._letters_backoff = min(self._letters_backoff * 2, BACKOFF_MAX_S)
            return False
        for letter in letters:
            self.metrics.records_dead_lettered.labels(letter.reason).inc()
        self.totals.dead_lettered += len(letters)
        self.metrics.acks.inc(len(letters))
        self.totals.acked += len(letters)
        return True

    def _retry_letters(self, force: bool = False) -> None:
        """Store the held dead letters again once their back-off has passed; acknowledge them if stored."""
        if not self._letters or (not force and time.monotonic() < self._letters_retry_at):
            return
        held, self._letters = self._letters, []
        if self._store_letters(held):
            self._inflight_ids.difference_update(d.source_id for d in held)
            self.health.problem("dead letters", None)
            self._letters_backoff = BACKOFF_START_S
            log.info("stored %d held dead letters", len(held), extra={"consumer": self.consumer.consumer})
            return
        self._letters = held

    # --- settling written batches ---

    def settle(self, block_s: float = 0.0) -> int:
        """Acknowledge every finished batch (waiting up to ``block_s`` for one); the number settled."""
        if not self.inflight:
            return 0
        if block_s > 0 and not any(b.future.done() for b in self.inflight):
            wait_futures([b.future for b in self.inflight], timeout=block_s, return_when=FIRST_COMPLETED)
        done = [b for b in self.inflight if b.future.done()]
        for batch in done:
            self.inflight.remove(batch)
            self._inflight_ids.difference_update(batch.ids)
            self._settle_batch(batch)
        self.metrics.inflight_batches.set(len(self.inflight))
        return len(done)

    def _settle_batch(self, batch: Batch) -> None:
        try:
            results = batch.future.result()
        except Exception:  # the writer logged it; the entries stay pending and come back
            log.exception("batch of %d failed unexpectedly; its entries stay pending", len(batch.records))
            self.totals.failed += len(batch.records)
            return
        stored: list[str] = []
        letters: list[DeadLetter] = []
        inserted = duplicate = failed = 0
        commit_s = batch.committed_at or self.clock()
        mixed: Sequence[WriteResult] = results
        if results.count(INSERTED) == len(batch.records):  # the usual batch, all new: no per-record loop
            stored, inserted, mixed = batch.ids, len(batch.records), ()
        for record, result in zip(batch.records, mixed):
            status = result.status
            if status is _INSERTED:
                inserted += 1
            elif status is _DUPLICATE:
                duplicate += 1
            else:
                failed += 1
                self._transient_failures += result.transient
                if not result.transient and record.deliveries >= self.max_deliveries:
                    letters.append(DeadLetter(record.entry_id, record.payload, DB_REJECTED,
                                              result.error or "rejected by PostgreSQL", record.deliveries))
                continue
            stored.append(record.entry_id)
        observe_ages(self.metrics.end_to_end_seconds, commit_s, stored)
        if inserted or duplicate:
            self.health.postgres_result(None)
        self.totals.inserted += inserted
        self.totals.duplicate += duplicate
        self.totals.failed += failed - len(letters)
        self._settle_unwritable(letters, [])
        self._ack(stored)
        log.debug("batch written inserted=%d duplicates=%d failed=%d", inserted, duplicate, failed,
                  extra={"consumer": self.consumer.consumer})
        self._run_handlers(batch.records, results)

    def _run_handlers(self, records: Sequence[Record], results: Sequence[WriteResult]) -> None:
        for handler in self.handlers:
            try:
                handler(records, results, self.state)
            except Exception:
                self.metrics.domain_handler_errors.inc()
                log.exception("domain handler %r failed; the batch is acknowledged regardless", handler)

    # --- acknowledging ---

    def _read(self) -> list[Entry]:
        """The next batch. While writes are in flight, pending acknowledgements ride in the same
        round trip (XACK then XREADGROUP): the main loop waits for Redis once per batch, not twice."""
        ids = self._unacked
        entries = self.consumer.read(block_ms=SETTLE_POLL_MS if self.inflight else None, ack=ids)
        if ids:
            self._acked(ids)
        return entries

    def _ack(self, ids: list[str]) -> None:
        if not ids:
            return
        self._unacked.extend(ids)
        if not self._defer_acks:
            self._try_flush_acks()

    def _try_flush_acks(self) -> None:
        """XACK what is pending acknowledgement; a failure is logged and retried later."""
        try:
            self._flush_acks()
        except TransientError as exc:
            self.metrics.redis_errors.inc()
            self.health.redis_result(str(exc))
            log.warning("XACK of %d entries failed, will retry: %s", len(self._unacked), exc)
        except StreamGoneError:
            # The group is gone, and with it the pending list: there is nothing left to acknowledge.
            self._unacked.clear()

    def _flush_acks(self) -> None:
        if not self._unacked:
            return
        ids = self._unacked
        self.consumer.ack(ids)
        self._acked(ids)

    def _acked(self, ids: list[str]) -> None:
        """``ids`` (all of ``_unacked``: nothing is added while a read or XACK is under way) are done."""
        self.metrics.acks.inc(len(ids))
        self.totals.acked += len(ids)
        self._unacked = []

    # --- keeping held entries fresh, reclaim (CONTRACT 4 rules 5 and 14) ---

    def held_ids(self) -> list[str]:
        """Entries pending in Redis that this process holds: in flight, stored but not yet
        acknowledged, or dead letters not yet stored."""
        return [*self._inflight_ids, *self._unacked]

    def _keep_fresh(self, force: bool = False) -> None:
        """XCLAIM (JUSTID) our held entries to ourselves every ``touch_every_s``: their idle time
        stays below RECLAIM_IDLE_MS however long PostgreSQL makes them wait, so nobody claims
        them, and their delivery counts only grow when an attempt really ended."""
        now = time.monotonic()
        if not force and now < self._next_touch:
            return
        self._next_touch = now + self.touch_every_s
        ids = self.held_ids()
        if not ids:
            return
        try:
            self.consumer.touch(ids)
        except (TransientError, StreamGoneError) as exc:
            # The read that follows meets the same failure and backs off; nothing to add here.
            self.metrics.redis_errors.inc()
            log.warning("could not keep %d held entries fresh: %s", len(ids), exc,
                        extra={"consumer": self.consumer.consumer})

    def _may_claim(self) -> bool:
        """No claiming while PostgreSQL is not writable (a failed write or probe, a write stalled
        on a lock): claimed entries could not be written, and each claim counts a delivery."""
        writable, why = self.writer.writable()
        if not writable:
            if self._reclaim_paused is None:
                log.warning("reclaim paused: PostgreSQL is not writable: %s", why,
                            extra={"consumer": self.consumer.consumer})
            self._reclaim_paused = why
            self._next_reclaim = time.monotonic() + self.reclaim_every_s
            return False
        if self._reclaim_paused is not None:
            log.info("reclaim resumed: PostgreSQL is writable again", extra={"consumer": self.consumer.consumer})
            self._reclaim_paused = None
        return True

    @property
    def reclaim_cursor(self) -> str:
        """Where the next XAUTOCLAIM page starts; ``0-0`` once a full pass is done."""
        return self._reclaim_cursor

    def reclaim_once(self, limit: int | None = None) -> int:
        """Claim one page of entries idle longer than ``reclaim_idle_ms`` on any consumer and process it.

        Our held entries are touched first, so that the page cannot contain them.
        """
        self._next_reclaim = time.monotonic() + self.reclaim_every_s
        self._keep_fresh(force=True)
        count = self.consumer.batch_size if limit is None else min(limit, self.consumer.batch_size)
        cursor, entries, deleted = self.consumer.claim(self.reclaim_idle_ms, self._reclaim_cursor, count)
        self._reclaim_cursor = cursor
        fresh = [e for e in entries if e.entry_id not in self._inflight_ids]
        if fresh or deleted:
            self.metrics.reclaimed.inc(len(fresh))
            log.info("reclaimed %d idle entries (%d with no data)", len(fresh), len(deleted),
                     extra={"consumer": self.consumer.consumer})
        if deleted:
            self.process([Entry(i, None) for i in deleted])
        if fresh:
            self.process(fresh)
        if cursor != "0-0":
            self._next_reclaim = time.monotonic()  # more pages: follow the cursor next turn
        return len(fresh) + len(deleted)

    # --- shutdown ---

    def drain(self, deadline: float) -> bool:
        """Wait for in-flight writes and acknowledge them, until ``deadline`` (monotonic).

        True if every one was settled: written or rejected, not given up on a transient error.
        """
        self._transient_failures = 0
        while self.inflight and time.monotonic() < deadline:
            self.health.turned()
            self._keep_fresh()
            self.settle(block_s=min(0.2, max(deadline - time.monotonic(), 0.01)))
        self._retry_letters(force=True)
        try:
            self._flush_acks()
        except ProcessorError as exc:  # any kind: the stop sequence must go on
            log.warning("final XACK failed; those entries stay pending and will be written again: %s", exc)
        return not self.inflight and not self._unacked and not self._transient_failures and not self._letters

    def left_over(self) -> int:
        """Entries read but not settled (still pending in Redis, so not lost)."""
        return (sum(len(b.records) for b in self.inflight) + len(self._unacked) + self._transient_failures
                + len(self._letters))

    # --- heartbeat ---

    def _heartbeat(self) -> None:
        now = time.monotonic()
        if now - self._last_heartbeat < HEARTBEAT_S:
            return
        done = self.totals.inserted + self.totals.duplicate + self.totals.dead_lettered
        rate = (done - self._heartbeat_base) / (now - self._last_heartbeat)
        self._last_heartbeat, self._heartbeat_base = now, done
        if rate > 0 or self.inflight:
            log.info("heartbeat records_per_s=%.0f lag=%s pending=%s inflight=%d", rate,
                     _gauge(self.metrics.stream_lag), _gauge(self.metrics.pending_entries), len(self.inflight),
                     extra={"consumer": self.consumer.consumer})


# Garbage-collector settings for the main loop (docs/performance.md). Each entry allocates
# a dozen containers (the parsed payload, its attributes, the Entry, Position, Record),
# so with the default threshold of 700 the young generation is collected every few dozen
# entries and the old ones, device state included, are walked again and again: about a
# fifth of the main thread's time. Nothing on the hot path makes reference cycles, so
# refcounting frees almost everything and rarer collections cost no memory to speak of.
GC_GEN0_THRESHOLD = 50_000

# The main thread holds the GIL while it decodes; a writer thread whose libpq call has returned
# waits for it at each hand-back, up to the switch interval. 1 ms instead of Python's 5 ms:
# catch-up 96,100 -> 98,000/s, nine interleaved runs each (docs/performance.md, round 4).
SWITCH_INTERVAL_S = 0.001


def tune_gc() -> None:
    """Move everything allocated so far (modules, configuration, clients) out of the
    collector's sight and make young collections rarer. Process-wide; idempotent."""
    gc.freeze()
    _, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(GC_GEN0_THRESHOLD, gen1, gen2)


def tune_switching() -> None:
    """Ask a thread holding the GIL to hand it over after ``SWITCH_INTERVAL_S`` instead of
    Python's 5 ms. Process-wide; idempotent."""
    sys.setswitchinterval(SWITCH_INTERVAL_S)


_new_record = tuple.__new__  # Record(...) without the Python-level __new__, for the per-entry loop
_ENTRY_ID = operator.itemgetter(0)  # Record.entry_id (and Entry.entry_id), without a Python-level loop
_FIELDS = operator.itemgetter(1)  # Entry.fields
_DELIVERIES = operator.itemgetter(2)  # Entry.deliveries
_PAYLOAD_OF = operator.itemgetter(b"payload")  # of fields the decoder took: they have one
_RECORD = itertools.repeat(Record)
_POSITION = operator.itemgetter(1)  # Record.position
_INSERTED = WriteStatus.INSERTED
_DUPLICATE = WriteStatus.DUPLICATE


def _id_times_ms(entry_ids: Sequence[str]) -> list[int]:
    """The millisecond part of each ``ms-seq`` id: one join, one split, one ``map(int)`` (no call per id)."""
    return list(map(int, " ".join(entry_ids).replace("-", " ").split(" ")[::2]))


def observe_ages(histogram: Histogram, now_s: float, entry_ids: Sequence[str]) -> None:
    """``histogram.observe(max(now_s - time of the id, 0.0))`` for each stream entry id, in C-level passes.

    observe() takes a lock and walks the bounds for every value, and the ids' times cost a
    Python call each: together about 10,000 instructions a position (docs/performance.md).
    Here the ids' times are parsed in C-level passes over the joined ids and sorted (a batch's
    ids already are, so the sort is one linear pass); each bucket's count is then one bisection
    (an age is at most a bound when the id's time is at least ``now - bound``) and the sum
    comes from the times' sum. Through the histogram's own (long-stable) ``_upper_bounds``,
    ``_buckets`` and ``_sum``; if those ever change, this falls back to observe(). An age
    within a float's rounding of a bound may land in the next bucket, which observe() would
    not do; no count is lost.
    """
    if not entry_ids:
        return
    try:
        bounds, buckets, total = histogram._upper_bounds, histogram._buckets, histogram._sum  # type: ignore[attr-defined]
    except AttributeError:
        for ms in _id_times_ms(entry_ids):
            histogram.observe(max(now_s - ms / 1000, 0.0))
        return
    times = sorted(_id_times_ms(entry_ids))
    n = len(times)
    now_ms = now_s * 1000.0
    past = bisect_right(times, now_ms)  # ids from a clock ahead of ours count as age 0, as observe() clamps
    if past:
        # From the oldest id's age, so that no large float is rounded: now_s minus a whole second near it is
        # exact, and the ids' times add up exactly as integers.
        base = times[0]
        oldest_age = (now_s - base // 1000) - (base % 1000) / 1000
        spread_ms = sum(times if past == n else times[:past]) - past * base
        total.inc(past * oldest_age - spread_ms / 1000)
    below = 0  # ages at most the previous bound
    for index, bound in enumerate(bounds):
        within = n if bound == _INF else n - bisect_left(times, now_ms - bound * 1000.0)
        if within > below:
            buckets[index].inc(within - below)
            below = within


_INF = float("inf")


def _gauge(g: object) -> str:
    try:
        return f"{g._value.get():.0f}"  # type: ignore[attr-defined]
    except AttributeError:
        return "?"
