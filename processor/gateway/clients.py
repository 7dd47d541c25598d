"""One connected client: its subscriptions, at most one pending message per subscription, and its writer.

Every message a client gets is an :class:`~processor.gateway.subscriptions.Update` of one of its groups,
encoded once and shared with the group's other members: the client only writes its frames.

- The flush loop *offers* each group's update to every member and never waits on one. A member with nothing
  unsent and an empty write buffer gets it written at once, in the flush, as far as its socket takes it
  (:meth:`Client.offer`): no task switch, no copy. The rest of it, and everything else, is written by the
  client's writer task, one fragment at a time under websockets' flow control.
- A member whose previous update for that subscription is still unsent replaces it with a catch-up marker:
  when it can write again, it gets what its group changed since (latest position per device), encoded by the
  group once for all the members asking the same (:meth:`~processor.gateway.subscriptions.Group.catch_up`).
  So a client holds no positions of its own, one small marker per subscription, and at most one fragment
  (64 KiB) beyond websockets' 32 KiB write limit in its buffer, however slow it is.
- Replies to the client's own messages (errors, pong, auth) go through the same writer, between messages:
  data frames of two messages never interleave.
- ``backlog_since`` says since when it has had something unsent; the server closes a client backlogged for
  GATEWAY_SLOW_CLIENT_S with 1013.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from typing import Any, Callable

from . import frames
from .latest import Fix
from .metrics import GatewayMetrics
from .subscriptions import Filter, Group, Update

log = logging.getLogger(__name__)


class CatchUp:
    """A pending message for a member that fell behind: whatever its group changed after generation ``since``."""

    __slots__ = ("since",)

    def __init__(self, since: int) -> None:
        self.since = since


class Init:
    """A new subscription's init, encoded when it is written (so it holds the latest positions of that moment)."""

    __slots__ = ()


INIT = Init()
Pending = Update | CatchUp | Init


class Writing:
    """A message being written: its frames (as this client gets them) and how many are written; ``done`` is a
    reply's waiter."""

    __slots__ = ("message", "frames", "nbytes", "uid", "next", "done")

    def __init__(self, message: Update, deflate_bits: int | None, uid: str | None,
                 done: asyncio.Future[None] | None = None) -> None:
        self.message = message
        self.frames, self.nbytes = message.frames(deflate_bits)
        self.uid = uid
        self.next = 0
        self.done = done


def account(metrics: GatewayMetrics, message: Update, clients: int, nbytes: int, now: float) -> None:
    """``message`` was written whole to ``clients`` clients (``nbytes`` in all) at ``now`` (time.time())."""
    metrics.updates_sent.inc(clients)
    metrics.positions_sent.inc(message.size * clients)
    metrics.bytes_sent.inc(nbytes)
    if message.event == "update" and message.size:
        age = max(0.0, now - message.oldest_entry_ms / 1000)
        for _ in range(clients):
            metrics.entry_to_send_seconds.observe(age)


class Client:
    """``initial(filter)`` gives the latest position of each device a filter matches (for inits)."""

    def __init__(self, conn: Any, *, scope: frozenset[str] | None, metrics: GatewayMetrics,
                 initial: Callable[[Filter], list[Fix]], clock: Callable[[], float] = time.monotonic) -> None:
        self.conn = conn
        self.deflate_bits = frames.deflate_bits(conn)  # None: this client gets uncompressed messages
        self.scope = scope
        self.metrics = metrics
        self.initial = initial
        self.clock = clock
        self.subscriptions: dict[str, Group] = {}
        self.pending: dict[str, Pending] = {}
        self.replies: deque[tuple[Update, asyncio.Future[None]]] = deque()
        self.writing: Writing | None = None
        self.backlog_since: float | None = None
        self.closing = False
        self.expiry: asyncio.TimerHandle | None = None  # the token's expiry (server._expire_at)
        self._wake = asyncio.Event()

    # --- called by the flush loop and the message handler (the event loop's thread) ---

    def offer(self, uid: str, update: Update) -> int:
        """Take ``update`` for subscription ``uid``. Its bytes if it was written whole now (the caller accounts
        for it); else 0: it is being written, or pending, or a catch-up marker replaced the one still pending."""
        if self.closing:
            return 0
        previous = self.pending.get(uid)
        if previous is None:
            if self.writing is None and not self.pending and not self.replies and frames.is_open(self.conn) \
                    and not frames.buffered(self.conn):
                writing = Writing(update, self.deflate_bits, uid)
                if self._write_now(writing):
                    return writing.nbytes
                self.writing = writing  # the socket took part of it: the writer task writes the rest
            else:
                self.pending[uid] = update
        elif isinstance(previous, Update):
            # Held back: the next message is built from the group, from the generation before this one.
            self.pending[uid] = CatchUp(previous.gen - 1)
            self.metrics.positions_coalesced.labels("slow_client").inc(previous.size)
        # A pending CatchUp or Init already covers this update.
        self._backlogged()
        return 0

    def _write_now(self, writing: Writing) -> bool:
        """Write frames while the socket takes them whole; True when the message is all written."""
        conn, message = self.conn, writing.frames
        while writing.next < len(message):
            if writing.next and frames.buffered(conn):
                return False
            frames.write(conn, message[writing.next])
            writing.next += 1
        return True

    def send_init(self, uid: str) -> None:
        """Queue the init message of a new subscription (replacing anything pending for that uid)."""
        self.pending.pop(uid, None)
        self.pending[uid] = INIT
        self._backlogged()

    async def reply(self, payload: bytes) -> None:
        """Send an answer to the client's own message (error, pong, auth) between messages; returns once it is
        written (so a client that sends without reading is not answered faster than it reads)."""
        if self.closing:
            return
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.replies.append((Update(payload, 0, 0, 0, "reply"), done))
        self._backlogged()
        await done

    def drop(self, uid: str) -> None:
        self.pending.pop(uid, None)

    def abandon(self) -> None:
        """The connection is being closed: nothing more is written, and waiting replies are released."""
        self.closing = True
        self.pending.clear()
        self.writing = None
        while self.replies:
            _, done = self.replies.popleft()
            if not done.done():
                done.set_result(None)
        self._wake.set()

    def _backlogged(self) -> None:
        if self.backlog_since is None:
            self.backlog_since = self.clock()
        self._wake.set()

    # --- the writer task ---

    async def run_writer(self) -> None:
        """Write replies, then pending messages (oldest subscription first), until the connection closes."""
        while True:
            await self._wake.wait()
            self._wake.clear()
            while not self.closing:
                writing = self.writing or self._next()
                if writing is None:
                    break
                self.writing = writing
                if not await self._write_out(writing):
                    self.abandon()  # the connection is closing: its handler ends and forgets the client
                    break
                self.writing = None
                self._written(writing)
            if not self.closing:
                self.backlog_since = None

    def _next(self) -> Writing | None:
        if self.replies:
            reply, done = self.replies.popleft()
            return Writing(reply, None, None, done)  # short: uncompressed
        while self.pending:
            uid = next(iter(self.pending))
            item = self.pending.pop(uid)
            group = self.subscriptions.get(uid)
            if group is None:
                continue
            message = self._message(group, item)
            if message is not None:
                return Writing(message, self.deflate_bits, uid)
        return None

    def _message(self, group: Group, item: Pending) -> Update | None:
        if isinstance(item, Update):
            return item
        def everything() -> list[Fix]:
            return self.initial(group.filter)
        if isinstance(item, Init):
            return group.init(everything)
        before = group.catch_ups_encoded
        message = group.catch_up(item.since, everything)
        self.metrics.updates_encoded.inc(group.catch_ups_encoded - before)
        return message if message.size else None

    async def _write_out(self, writing: Writing) -> bool:
        """Write the rest of a message, one frame at a time under flow control; False if the connection closes."""
        conn, message = self.conn, writing.frames
        while writing.next < len(message):
            if not frames.is_open(conn):
                return False
            frames.write(conn, message[writing.next])
            writing.next += 1
            await frames.drain(conn)
        return True

    def _written(self, writing: Writing) -> None:
        if writing.done is not None:
            if not writing.done.done():
                writing.done.set_result(None)
            return
        account(self.metrics, writing.message, 1, writing.nbytes, time.time())
