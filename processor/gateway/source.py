"""Where positions come from: the stream's last id, the snapshot from ``positions``, then plain XREAD.

Order (CONTRACT 9): note the stream's last id *first*, then load each device's latest stored
position, then read from the noted id. An entry added meanwhile is read from the stream (and the
state keeps whichever of it and the stored row is newer): nothing falls in between.

Plain XREAD, no consumer group: every gateway instance sees every entry and acknowledges nothing.
Entries go through the processor's own decoder; rejected ones are skipped and counted.
"""

from __future__ import annotations

import logging
import threading
import time
from datetime import timezone
from typing import Any, Callable

import redis

from ..core import db
from ..core.consumer import translate
from ..core.decode import Decoder
from ..core.errors import ProcessorError, TransientError
from ..core.health import Health
from ..core.types import Position
from .latest import Fix, LatestPositions, to_fix
from .metrics import GatewayMetrics

log = logging.getLogger(__name__)

READ_COUNT = 1000
BACKOFF_START_S = 0.5
BACKOFF_MAX_S = 30.0
LAG_EVERY_S = 2.0

# One row per device: its latest position within the window (DISTINCT ON walks the (device_id, ts) key).
SNAPSHOT_SQL = """
SELECT DISTINCT ON (device_id) device_id, ts, latitude, longitude, altitude, angle, speed, satellites,
       priority, event_id, attributes
  FROM positions
 WHERE ts > now() - make_interval(secs => %s)
 ORDER BY device_id, ts DESC
"""


def id_ms(entry_id: str) -> int:
    return int(entry_id.split("-", 1)[0])


def last_entry_id(client: redis.Redis, stream: str) -> str:
    """The id of the stream's newest entry, or ``0-0`` if there is none (or no stream yet)."""
    newest = translate("XREVRANGE", lambda: client.xrevrange(stream, count=1))
    if not newest:
        return "0-0"
    eid = newest[0][0]
    return eid.decode() if isinstance(eid, bytes) else str(eid)


def load_snapshot(dsn: str, hours: float) -> list[Fix]:
    """Each device's latest stored position of the last ``hours``; :class:`TransientError` if PostgreSQL fails."""
    import psycopg2

    conn = db.connect(dsn, application_name="telemetry-gateway")
    try:
        conn.set_session(readonly=True)
        with conn.cursor() as cur:
            cur.execute(SNAPSHOT_SQL, (hours * 3600,))
            rows = cur.fetchall()
        conn.rollback()
    except psycopg2.Error as exc:
        raise TransientError(f"snapshot query: {db.describe(exc)}") from exc
    finally:
        conn.close()
    fixes = []
    for row in rows:
        p = Position(*row)._replace(ts=row[1].astimezone(timezone.utc))
        fixes.append(to_fix(p, int(p.ts.timestamp() * 1000)))
    return fixes


class StreamReader:
    """Reads the stream from a given id in its own thread and feeds :class:`LatestPositions`."""

    def __init__(self, *, client: redis.Redis, stream: str, start_id: str, decoder: Decoder,
                 latest: LatestPositions, metrics: GatewayMetrics, health: Health, stop: threading.Event,
                 block_ms: int = 1000, count: int = READ_COUNT,
                 on_batch: Callable[[], None] | None = None) -> None:
        self.client = client
        self.stream = stream
        self.last_id = start_id
        self.decoder = decoder
        self.latest = latest
        self.metrics = metrics
        self.health = health
        self.stop = stop
        self.block_ms = block_ms
        self.count = count
        self.on_batch = on_batch
        self._thread = threading.Thread(target=self._run, name="gateway-xread", daemon=True)
        self._lag_at = 0.0

    def start(self) -> None:
        self._thread.start()

    def alive(self) -> bool:
        return self._thread.is_alive()

    def join(self, timeout: float) -> bool:
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def _run(self) -> None:
        delay = BACKOFF_START_S
        while not self.stop.is_set():
            try:
                self._read_once()
                delay = BACKOFF_START_S
            except TransientError as exc:
                self.metrics.redis_errors.inc()
                self.health.redis_result(str(exc))
                log.warning("XREAD failed, retrying in %.1fs: %s", delay, exc)
                self.stop.wait(delay)
                delay = min(delay * 2, BACKOFF_MAX_S)
            except ProcessorError as exc:  # a Redis error reply (WRONGTYPE...): an operator must act
                self.metrics.redis_errors.inc()
                self.health.redis_result(str(exc))
                log.error("XREAD refused, retrying in %.1fs: %s", BACKOFF_MAX_S, exc)
                self.stop.wait(BACKOFF_MAX_S)
            except Exception:  # a bug of ours: log it with the traceback, and keep the gateway serving
                log.exception("stream reader failed; retrying in %.1fs", BACKOFF_MAX_S)
                self.stop.wait(BACKOFF_MAX_S)

    def _read_once(self) -> None:
        reply: Any = translate("XREAD", lambda: self.client.xread(
            {self.stream: self.last_id}, count=self.count, block=self.block_ms))
        self.health.redis_result(None)
        entries = reply[0][1] if reply else []
        if entries:
            self._apply(entries)
        self._refresh_lag(len(entries))

    def _apply(self, entries: list[Any]) -> None:
        m = self.metrics
        now = time.time()
        fixes = []
        for raw_id, fields in entries:
            entry_id = raw_id.decode() if isinstance(raw_id, bytes) else raw_id
            result = self.decoder.decode(fields, now)
            if isinstance(result, Position):
                try:
                    fixes.append(to_fix(result, id_ms(entry_id)))
                except TypeError:  # attributes orjson cannot encode (cannot happen after decode; counted)
                    m.entries_rejected.labels("invalid_type").inc()
            else:
                m.entries_rejected.labels(result.reason).inc()
        self.last_id = entry_id
        m.entries_read.inc(len(entries))
        applied = self.latest.apply(fixes)
        m.positions_stale.inc(applied.stale)
        m.positions_coalesced.labels("flush").inc(applied.coalesced)
        m.devices_tracked.set(len(self.latest))
        if self.on_batch is not None:
            self.on_batch()

    def _refresh_lag(self, n: int) -> None:
        """``stream_lag_seconds``: 0 after a read that was not full (caught up); else measured every few seconds."""
        now = time.monotonic()
        if n < self.count:
            self.metrics.stream_lag.set(0)
            return
        if now - self._lag_at < LAG_EVERY_S:
            return
        self._lag_at = now
        newest = last_entry_id(self.client, self.stream)
        self.metrics.stream_lag.set(max(0, id_ms(newest) - id_ms(self.last_id)) / 1000)
