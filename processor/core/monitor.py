"""Background refresh of the gauges a scrape must never wait on: stream lag, pending, readiness.

Runs in a daemon thread, every ``interval_s`` (5 s by default): XINFO GROUPS
for lag and pending, and the writer's writability probe when no write has said
anything recently, so that /readyz tells the truth while the stream is idle.
"""

from __future__ import annotations

import logging
import threading
from typing import Callable, Protocol

from .consumer import StreamConsumer
from .errors import ProcessorError, StreamGoneError, TransientError
from .health import Health
from .metrics import Metrics

log = logging.getLogger(__name__)

REFRESH_S = 5.0


class Probeable(Protocol):
    def probe(self) -> None: ...

    def writable(self) -> tuple[bool, str]: ...


class Monitor:
    def __init__(self, *, consumer: StreamConsumer, writer: Probeable, metrics: Metrics, health: Health,
                 devices: Callable[[], int], interval_s: float = REFRESH_S) -> None:
        self.consumer = consumer
        self.writer = writer
        self.metrics = metrics
        self.health = health
        self.devices = devices
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="monitor", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 2.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.refresh()
            except Exception:  # never let the monitor die: it is what tells operators something is wrong
                log.exception("metrics refresh failed")
            self._stop.wait(self.interval_s)

    def refresh(self) -> None:
        """One refresh of every background gauge (also called directly by tests)."""
        self._refresh_stream()
        self._refresh_postgres()
        ready, _ = self.health.ready()
        self.metrics.ready.set(1 if ready else 0)
        self.metrics.devices_tracked.set(self.devices())

    def _refresh_stream(self) -> None:
        try:
            lag, pending = self.consumer.group_stats()
        except StreamGoneError as exc:
            self.health.redis_result(str(exc))
            return
        except TransientError as exc:
            self.metrics.redis_errors.inc()
            self.health.redis_result(str(exc))
            return
        except ProcessorError as exc:  # e.g. the key holds another type: an operator's mistake, say it
            self.health.redis_result(str(exc))
            return
        if lag is not None:
            self.metrics.stream_lag.set(lag)
        self.metrics.pending_entries.set(pending)

    def _refresh_postgres(self) -> None:
        """Readiness follows writability, not reachability: a ``SELECT 1`` answers while writes
        wait on a lock, are refused for privilege or hit a read-only server. When no write has
        said anything recently, the writer's probe (a zero-row INSERT) asks."""
        writable, why = self.writer.writable()
        if writable and self.health.postgres_ok() and self.health.postgres_age() < self.interval_s:
            return  # a write said so recently enough
        if not writable:
            self.health.postgres_result(why)
        try:
            self.writer.probe()
        except TransientError as exc:
            self.metrics.postgres_errors.inc()
            self.health.postgres_result(str(exc))
            return
        writable, why = self.writer.writable()
        self.health.postgres_result(None if writable else why)
