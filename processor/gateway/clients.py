"""One connected client: its subscriptions, at most one pending message per subscription, and its sender.

The flush loop *offers* each group's update to every member; it never waits on a client. A client
whose previous message for that subscription is still unsent merges the new one into it (latest
position per device wins), so what a client holds is bounded by the devices its subscriptions
match, never by how slow it is. The client's sender task writes its pending messages one at a time;
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
from .subscriptions import Group, Update

log = logging.getLogger(__name__)


class Merged:
    """A pending message built from several: ``init`` (never sent yet) or updates a slow client missed."""

    __slots__ = ("event", "fixes")

    def __init__(self, event: str, fixes: dict[str, Fix]) -> None:
        self.event = event
        self.fixes = fixes


Pending = Update | Merged


class Client:
    def __init__(self, conn: Any, *, scope: frozenset[str] | None, metrics: GatewayMetrics,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.conn = conn
        self.scope = scope
        self.metrics = metrics
        self.clock = clock
        self.subscriptions: dict[str, Group] = {}
        self.pending: dict[str, Pending] = {}
        self.backlog_since: float | None = None
        self.closing = False
        self.expiry: asyncio.TimerHandle | None = None  # the token's expiry (server._expire_at)
        self._wake = asyncio.Event()

    # --- called by the flush loop and the message handler (the event loop's thread) ---

    def offer(self, uid: str, update: Update) -> None:
        """Queue ``update`` for subscription ``uid``, merging it into what is still unsent."""
        if self.closing:
            return
        previous = self.pending.get(uid)
        if previous is None:
            self.pending[uid] = update
        else:
            merged = previous if isinstance(previous, Merged) else \
                Merged("update", {f.device_id: f for f in previous.fixes})
            before = len(merged.fixes)
            for fix in update.fixes:
                merged.fixes[fix.device_id] = fix
            self.metrics.positions_coalesced.labels("slow_client").inc(before + len(update.fixes)
                                                                      - len(merged.fixes))
            self.pending[uid] = merged
        self._backlogged()

    def send_init(self, uid: str, fixes: list[Fix]) -> None:
        """Queue the init message of a new subscription (replacing anything pending for that uid)."""
        self.pending.pop(uid, None)
        self.pending[uid] = Merged("init", {f.device_id: f for f in fixes})
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
                await self._send(uid, item)
            if not self.pending:
                self.backlog_since = None

    async def _send(self, uid: str, item: Pending) -> None:
        m = self.metrics
        if isinstance(item, Update):
            frame, count, oldest = item.frame, len(item.fixes), item.oldest_entry_ms
            event = "update"
        else:
            fixes = item.fixes.values()
            frame = subscription_frame(uid, item.event, [f.json for f in fixes])
            count, event = len(item.fixes), item.event
            oldest = min((f.entry_ms for f in fixes), default=0)
            if event == "update":
                m.updates_encoded.inc()
        await self.conn.send(frame, text=True)
        m.updates_sent.inc()
        m.positions_sent.inc(count)
        m.bytes_sent.inc(len(frame))
        if event == "update" and count:
            m.entry_to_send_seconds.observe(max(0.0, time.time() - oldest / 1000))
