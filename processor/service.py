"""The wiring: config -> PostgreSQL (with retry) -> migrate -> Redis (with retry) -> state -> writer
-> consumer with the sink. Also the one seam where domain rules plug in (``processor.domain``).

The stop sequence is in :meth:`Service.stop`: ordered, commented, under one deadline.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Any, Sequence

import redis
from prometheus_client import CollectorRegistry

from . import __version__
from .core import db
from .core.config import Config
from .core.consumer import StreamConsumer, redis_client, translate
from .core.deadletter import DeadLetters
from .core.decode import COMPILED, Decoder
from .core.errors import MigrationError, StreamGoneError, TransientError
from .core.health import Health
from .core.httpserver import MetricsServer
from .core.metrics import Metrics
from .core.monitor import Monitor
from .core.pipeline import BatchHandler, Pipeline
from .core.state import DeviceState
from .core.stop import deadline as stop_deadline
from .core.writer import Writer

log = logging.getLogger(__name__)

DECODER = "compiled" if COMPILED else "python"  # processor_info{decoder}, the start-up line

EXIT_OK = 0
EXIT_UNCLEAN = 1


def connect_redis(config: Config, *, stop: threading.Event, tick: Any = None,
                  on_error: Any = None) -> redis.Redis | None:
    """A Redis client that answered PING, retrying with backoff; None if ``stop`` came first."""
    client = redis_client(config.redis_url, block_ms=config.block_ms)
    ok = db.retry("connect to Redis", lambda: translate("PING", client.ping), stop=stop, tick=tick,
                  on_error=on_error)
    return client if ok is not None else None


class Service:
    """The running processor. ``start()`` then ``run()``; ``run`` returns the exit status."""

    def __init__(self, config: Config, *, stop: threading.Event, registry: CollectorRegistry | None = None,
                 handlers: Sequence[BatchHandler] | None = None, monitor_interval_s: float = 5.0) -> None:
        self.config = config
        self.stop_event = stop
        self.metrics = Metrics(registry=registry, version=__version__, decoder=DECODER)
        self.health = Health(block_ms=config.block_ms)
        self.handlers = handlers
        self.monitor_interval_s = monitor_interval_s
        self.http: MetricsServer | None = None
        self.redis: redis.Redis | None = None
        self.writer: Writer | None = None
        self.monitor: Monitor | None = None
        self.pipeline: Pipeline | None = None
        self.state = DeviceState(max_devices=config.device_state_max)

    # --- start ---

    def start(self) -> bool:
        """Connect, migrate and build the pipeline. False if a stop was requested first."""
        cfg = self.config
        log.info("processor starting", extra={"version": __version__, "consumer": cfg.consumer_name,
                                              "decoder": DECODER})
        if not COMPILED:
            log.warning("the decoder's compiled way was not built (no C compiler at install): decoding in "
                        "Python only, the same results at about two thirds of the throughput (README, Install)")
        if cfg.metrics_port:
            self.http = MetricsServer(host=cfg.metrics_host, port=cfg.metrics_port,
                                      registry=self.metrics.registry, health=self.health)
            self.http.start()
        if not self._prepare_postgres():
            return False
        self.redis = connect_redis(cfg, stop=self.stop_event, tick=self.health.turned, on_error=self._redis_error)
        if self.redis is None:
            return False
        log.info("Redis connected")
        consumer = StreamConsumer(client=self.redis, stream=cfg.stream_key, group=cfg.consumer_group,
                                  consumer=cfg.consumer_name, batch_size=cfg.batch_size, block_ms=cfg.block_ms)
        if db.retry("create the consumer group", consumer.ensure_group, stop=self.stop_event,
                    tick=self.health.turned, on_error=self._redis_error) is None:
            return False
        self.health.redis_result(None)
        # No stop event for the writer: on SIGTERM in-flight writes go on retrying until the
        # shutdown deadline, when stop() cancels the retries.
        self.writer = Writer(dsn=cfg.postgres_url, threads=cfg.writer_threads, metrics=self.metrics)
        self.writer.start()
        self.pipeline = self._build_pipeline(consumer, self.writer)
        self.monitor = Monitor(consumer=consumer, writer=self.writer, metrics=self.metrics, health=self.health,
                               devices=lambda: len(self.state), interval_s=self.monitor_interval_s)
        self.monitor.start()
        log.info("consumer started on stream %s group %s consumer %s", cfg.stream_key, cfg.consumer_group,
                 cfg.consumer_name)
        log.info("processor ready")
        return True

    def _prepare_postgres(self) -> bool:
        """Connect with retry (one warning per attempt), migrate under the advisory lock if asked."""
        def attempt() -> bool:
            conn = db.connect(self.config.postgres_url)
            try:
                log.info("Postgres connected")
                if self.config.migrate_on_start:
                    if not db.migrate(conn, stop=self.stop_event):
                        return False  # stopped while waiting for the migration lock
                else:
                    log.info("migrations skipped (MIGRATE_ON_START=false)")
            finally:
                conn.close()
            return True

        ok = db.retry("connect to PostgreSQL", attempt, stop=self.stop_event, tick=self.health.turned,
                      on_error=self._postgres_error)
        if ok and not self.stop_event.is_set():
            self.health.postgres_result(None)
        return bool(ok)

    # Start-up failures are counted and shown on /readyz like the running service's: an operator
    # looking at a service that never gets ready sees why ("connection refused"), not "no read yet".
    def _redis_error(self, exc: Exception) -> None:
        self.metrics.redis_errors.inc()
        self.health.redis_result(str(exc))

    def _postgres_error(self, exc: Exception) -> None:
        self.metrics.postgres_errors.inc()
        self.health.postgres_result(str(exc))

    def _build_pipeline(self, consumer: StreamConsumer, writer: Writer) -> Pipeline:
        handlers = self.handlers
        if handlers is None:
            # The one seam where domain rules plug in; the core never imports them.
            from .domain import default_handlers
            handlers = default_handlers(self.config)
        assert self.redis is not None
        return build_pipeline(self.config, consumer=consumer, client=self.redis, writer=writer,
                              metrics=self.metrics, health=self.health, state=self.state, handlers=handlers)

    # --- run and stop ---

    def run(self) -> int:
        """Start, turn until the stop event, stop. The process exit status."""
        crashed = False
        try:
            if not self.start():
                return self.stop(deadline=stop_deadline(self.stop_event, self.config.shutdown_timeout_s))
            assert self.pipeline is not None
            self.pipeline.run(self.stop_event)
        except MigrationError as exc:
            log.error("migrations failed: %s; apply schema.sql as its owner (telemetry-processor migrate) "
                      "or set MIGRATE_ON_START=false", exc)
            crashed = True
        except Exception:
            # Unexpected: log it, stop gracefully, exit non-zero so systemd or Docker restarts us.
            log.exception("unexpected error in the main loop; stopping")
            crashed = True
        code = self.stop(deadline=stop_deadline(self.stop_event, self.config.shutdown_timeout_s))
        return EXIT_UNCLEAN if crashed else code

    def stop(self, *, deadline: float) -> int:
        """The stop sequence, in order, under one deadline (SHUTDOWN_TIMEOUT_S after the stop request).
        0 if every in-flight write was settled."""
        self.stop_event.set()
        clean = True
        # 1. Reading has stopped: the main loop saw the event (every read blocks at most BLOCK_MS).
        # 2. Let in-flight writes finish and acknowledge them, until the deadline.
        if self.pipeline is not None:
            clean = self.pipeline.drain(deadline)
            if not clean:
                log.error("shutdown timeout: %d entries not settled; they stay pending and will be processed "
                          "on the next start", self.pipeline.left_over())
        # 3. Stop retrying writes; past the deadline, cancel queries still running (in threads of their
        #    own: a server that stopped answering cannot hold us) and close the PostgreSQL connections.
        if self.writer is not None:
            self.writer.cancel_retries()
            if not self.writer.close(max(deadline - time.monotonic(), 0.0)):
                clean = False
        # 4. The background monitor and the HTTP endpoint: daemon threads, waited for only within
        #    what is left of the deadline (the monitor may be inside a probe of a silent server).
        if self.monitor is not None:
            self.monitor.stop(timeout=max(deadline - time.monotonic(), 0.1))
        if self.http is not None:
            self.http.stop()
        # 5. Redis last: acknowledgements above needed it.
        if self.redis is not None:
            self.redis.close()
        log.info("processor stopped", extra={"clean": clean})
        return EXIT_OK if clean else EXIT_UNCLEAN


def build_pipeline(config: Config, *, consumer: StreamConsumer, client: redis.Redis, writer: Writer,
                   metrics: Metrics, health: Health, state: DeviceState, handlers: Sequence[BatchHandler] = (),
                   reclaim_idle_ms: int | None = None) -> Pipeline:
    """The pipeline as the configuration says (the service and replay share it)."""
    return Pipeline(
        consumer=consumer,
        decoder=Decoder(max_payload_bytes=config.max_payload_bytes, max_future_skew_s=config.max_future_skew_s),
        state=state, writer=writer,
        dead_letters=DeadLetters(client=client, stream=config.dead_letter_stream, source_stream=config.stream_key,
                                 group=config.consumer_group),
        metrics=metrics, health=health, max_inflight=config.max_inflight_batches,
        max_deliveries=config.max_deliveries,
        reclaim_idle_ms=config.reclaim_idle_ms if reclaim_idle_ms is None else reclaim_idle_ms,
        handlers=handlers)


# --- replay (CONTRACT 6) ---

@dataclass
class ReplaySummary:
    claimed: int = 0
    inserted: int = 0
    duplicate: int = 0
    dead_lettered: int = 0
    failed: int = 0
    lost: int = 0
    eligible: int | None = None
    stopped: str | None = None  # why claiming stopped early (PostgreSQL no longer writable)

    def line(self) -> str:
        text = (f"claimed={self.claimed} inserted={self.inserted} duplicate={self.duplicate} "
                f"dead_lettered={self.dead_lettered} failed={self.failed} lost={self.lost}")
        if self.eligible is not None:
            text += f" eligible={self.eligible} dry_run=true"
        return text

    @property
    def settled(self) -> bool:
        return (self.stopped is None and self.failed == 0
                and self.claimed == self.inserted + self.duplicate + self.dead_lettered + self.lost)


def replay(config: Config, *, min_idle_ms: int, limit: int | None, dry_run: bool,
           stop: threading.Event, page_timeout_s: float = 30.0) -> ReplaySummary:
    """Claim entries pending longer than ``min_idle_ms`` on any consumer and process them as the service does."""
    client = redis_client(config.redis_url, block_ms=config.block_ms)
    name = f"{config.consumer_name}-replay"
    consumer = StreamConsumer(client=client, stream=config.stream_key, group=config.consumer_group,
                              consumer=name, batch_size=config.batch_size, block_ms=config.block_ms)
    summary = ReplaySummary()
    try:
        if dry_run:
            summary.eligible = consumer.pending_idle(min_idle_ms, limit or 10_000_000)
            return summary
        _replay_claims(config, consumer, client, summary, min_idle_ms=min_idle_ms, limit=limit, stop=stop,
                       page_timeout_s=page_timeout_s)
        consumer.delete_consumer_if_idle(name)
    except StreamGoneError:
        # A new deployment before the service first ran: no group, so nothing can be pending.
        log.info("replay: stream %s has no group %s yet; nothing to claim", config.stream_key,
                 config.consumer_group)
        if dry_run:
            summary.eligible = 0
    finally:
        client.close()
    return summary


def _replay_claims(config: Config, consumer: StreamConsumer, client: redis.Redis, summary: ReplaySummary, *,
                   min_idle_ms: int, limit: int | None, stop: threading.Event, page_timeout_s: float) -> None:
    metrics = Metrics(version=__version__, decoder=DECODER)
    writer = Writer(dsn=config.postgres_url, threads=config.writer_threads, metrics=metrics)
    pipeline = build_pipeline(config, consumer=consumer, client=client, writer=writer, metrics=metrics,
                              health=Health(block_ms=config.block_ms),
                              state=DeviceState(max_devices=config.device_state_max), reclaim_idle_ms=min_idle_ms)
    try:
        while not stop.is_set() and (limit is None or summary.claimed < limit):
            # Nothing is claimed while PostgreSQL is not writable (CONTRACT 4 rule 14): each claim
            # counts a delivery and the claimed entries could not be written, so every run during an
            # outage would walk good entries towards max_deliveries. Asked before every page.
            try:
                writer.probe()
            except TransientError as exc:
                if not summary.claimed:
                    raise TransientError(f"PostgreSQL is not writable, nothing claimed: {exc}") from exc
                summary.stopped = str(exc)
                log.warning("replay: PostgreSQL is no longer writable, claiming stopped: %s", exc)
                break
            remaining = None if limit is None else limit - summary.claimed
            summary.claimed += pipeline.reclaim_once(limit=remaining)
            if not pipeline.drain(time.monotonic() + page_timeout_s):
                writer.cancel_retries()
                pipeline.drain(time.monotonic() + 5)
                break
            t = pipeline.totals
            log.info("replay progress: claimed=%d inserted=%d duplicate=%d dead_lettered=%d", summary.claimed,
                     t.inserted, t.duplicate, t.dead_lettered)
            if pipeline.reclaim_cursor == "0-0":
                break
    finally:
        writer.cancel_retries()
        writer.close(5.0)
    t = pipeline.totals
    summary.inserted, summary.duplicate = t.inserted, t.duplicate
    summary.dead_lettered, summary.lost = t.dead_lettered, t.lost
    summary.failed = summary.claimed - t.inserted - t.duplicate - t.dead_lettered - t.lost
