"""One connected client: its subscriptions, at most one pending message per subscription, and its sender.

The flush loop *offers* each group's update to every member; it never waits on a client. A client
whose previous update for that subscription is still unsent replaces it with a catch-up marker: when
it can send again, it gets what its group changed since (latest position per device), built from the
group. So a client holds no positions at all, one small marker per subscription, however slow it is.
The client's sender task writes its pending messages one at a time;
``backlog_since`` says since when it has had something unsent, and the server closes a client
backlogged for GATEWAY_SLOW_CLIENT_S with 1013.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Callable

from .latest import Fix
from .metrics import GatewayMetrics
from .protocol import subscription_frame
from .subscriptions import Filter, Group, Update

log = logging.getLogger(__name__)


class CatchUp:
    """A pending message for a member that fell behind: whatever its group changed after generation ``since``."""

    __slots__ = ("since",)

    def __init__(self, since: int) -> None:
        self.since = since


class Init:
    """A new subscription's init, built when it is sent (so it holds the latest positions of that moment)."""

    __slots__ = ()


INIT = Init()
Pending = Update | CatchUp | Init


class Client:
    """``initial(filter)`` gives the latest position of each device a filter matches (for init messages)."""

    def __init__(self, conn: Any, *, scope: frozenset[str] | None, metrics: GatewayMetrics,
                 initial: Callable[[Filter], list[Fix]], clock: Callable[[], float] = time.monotonic) -> None:
        self.conn = conn
        self.scope = scope
        self.metrics = metrics
        self.initial = initial
        self.clock = clock
        self.subscriptions: dict[str, Group] = {}
        self.pending: dict[str, Pending] = {}
        self.backlog_since: float | None = None
        self.closing = False
        self.expiry: asyncio.TimerHandle | None = None  # the token's expiry (server._expire_at)
        self._wake = asyncio.Event()

    # --- called by the flush loop and the message handler (the event loop's thread) ---

    def offer(self, uid: str, update: Update) -> None:
        """Queue ``update`` for subscription ``uid``; if one is still unsent, send what changed since instead."""
        if self.closing:
            return
        previous = self.pending.get(uid)
        if previous is None:
            self.pending[uid] = update
        elif isinstance(previous, Update):
            # Held back: the next message is built from the group, from the generation before this one.
            self.pending[uid] = CatchUp(previous.gen - 1)
            self.metrics.positions_coalesced.labels("slow_client").inc(previous.size)
        # A pending CatchUp or Init already covers this update.
        self._backlogged()

    def send_init(self, uid: str) -> None:
        """Queue the init message of a new subscription (replacing anything pending for that uid)."""
        self.pending.pop(uid, None)
        self.pending[uid] = INIT
        self._backlogged()

    def drop(self, uid: str) -> None:
        self.pending.pop(uid, None)

    def _backlogged(self) -> None:
        if self.backlog_since is None:
            self.backlog_since = self.clock()
        self._wake.set()

    # --- the sender task ---

    async def run_sender(self) -> None:
        """Write pending messages, oldest subscription first, until the connection closes."""
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self.pending and not self.closing:
                uid = next(iter(self.pending))
                item = self.pending.pop(uid)
                group = self.subscriptions.get(uid)
                if group is not None:
                    await self._send(uid, group, item)
            if not self.pending:
                self.backlog_since = None

    async def _send(self, uid: str, group: Group, item: Pending) -> None:
        m = self.metrics
        if isinstance(item, Update):
            frame, count, oldest, event = item.frame, item.size, item.oldest_entry_ms, "update"
        else:
            if isinstance(item, Init):
                event, fixes = "init", self.initial(group.filter)
            else:
                event, since = "update", group.since(item.since)
                # Fell behind further than the group remembers: every matching device's latest position.
                fixes = since if since is not None else self.initial(group.filter)
                m.updates_encoded.inc()
            frame = subscription_frame(uid, event, [f.json for f in fixes])
            count, oldest = len(fixes), min((f.entry_ms for f in fixes), default=0)
        await self.conn.send(frame, text=True)
        m.updates_sent.inc()
        m.positions_sent.inc(count)
        m.bytes_sent.inc(len(frame))
        if event == "update" and count:
            m.entry_to_send_seconds.observe(max(0.0, time.time() - oldest / 1000))
