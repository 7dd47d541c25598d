"""Prometheus metrics (CONTRACT 7), registered on an injected CollectorRegistry.

No label has unbounded cardinality: ``status`` has three values and ``reason``
the fixed set of CONTRACT 1.2.

Buckets, chosen for this workload:
- ``batch_write_seconds``: 1 ms (a few rows on a warm connection) to 10 s (a
  batch that waited on a lock or a checkpoint); anything slower is an incident
  that the +Inf bucket and the alerts catch.
- ``end_to_end_seconds``: 5 ms (the floor with a 1,000-row batch) to 5 min
  (catching up after an outage); the 30 s alert threshold falls on a bucket edge.
- ``batch_size``: powers of two up to 8,192 around the default of 1,000.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

from .types import REASONS

WRITE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
E2E_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.2, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)
STATUSES = ("inserted", "duplicate", "failed")
WAYS = ("compiled", "python")  # the decoder's ways (processor.core.decode)


class Metrics:
    """Every metric of the processor, as attributes, on one registry."""

    def __init__(self, *, registry: CollectorRegistry | None = None, version: str = "", decoder: str = "") -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        p = "processor_"
        self.records_consumed = Counter(p + "records_consumed", "Stream entries read", registry=r)
        self.entries_decoded = Counter(p + "entries_decoded", "Stream entries decoded, by the decoder's way that "
                                       "decided them: compiled (C) or python (the typed or the exact way)",
                                       ["way"], registry=r)
        self.records_written = Counter(p + "records_written", "Records written, by outcome",
                                       ["status"], registry=r)
        self.records_dead_lettered = Counter(p + "records_dead_lettered", "Entries dead-lettered, by reason",
                                             ["reason"], registry=r)
        self.acks = Counter(p + "acks", "Entries acknowledged (XACK)", registry=r)
        self.batch_write_seconds = Histogram(p + "batch_write_seconds", "Time to write one batch",
                                             buckets=WRITE_BUCKETS, registry=r)
        self.batch_size = Histogram(p + "batch_size", "Entries per batch read", buckets=SIZE_BUCKETS, registry=r)
        self.end_to_end_seconds = Histogram(p + "end_to_end_seconds",
                                            "Commit time minus the entry id's time", buckets=E2E_BUCKETS,
                                            registry=r)
        self.stream_lag = Gauge(p + "stream_lag", "Entries in the stream not yet delivered to the group "
                                "(XINFO GROUPS lag)", registry=r)
        self.pending_entries = Gauge(p + "pending_entries", "Entries delivered but not acknowledged (XPENDING)",
                                     registry=r)
        self.reclaimed = Counter(p + "reclaimed", "Entries claimed from idle consumers (XAUTOCLAIM)", registry=r)
        self.entries_lost = Counter(p + "entries_lost", "Pending entries whose data was trimmed or deleted",
                                    registry=r)
        self.inflight_batches = Gauge(p + "inflight_batches", "Batches read but not yet acknowledged", registry=r)
        self.devices_tracked = Gauge(p + "devices_tracked", "Devices in the in-memory state", registry=r)
        self.redis_errors = Counter(p + "redis_errors", "Redis operations that failed", registry=r)
        self.postgres_errors = Counter(p + "postgres_errors", "PostgreSQL operations that failed", registry=r)
        self.last_write_timestamp = Gauge(p + "last_write_timestamp_seconds",
                                          "Unix time of the last committed write", registry=r)
        self.domain_handler_errors = Counter(p + "domain_handler_errors", "Domain handler calls that raised",
                                             registry=r)
        self.ready = Gauge(p + "ready", "1 when the last Redis read and the last PostgreSQL write or ping "
                           "succeeded (as /readyz), else 0", registry=r)
        self.info = Info("processor", "Processor build information", registry=r)
        # decoder: "compiled" (processor/core/_speedups.c built at install) or "python" (it was not)
        self.info.info({"version": version, "decoder": decoder})
        # Pre-create every label value so that dashboards and alerts see zeros, not gaps.
        for status in STATUSES:
            self.records_written.labels(status)
        for way in WAYS:
            self.entries_decoded.labels(way)
        for reason in REASONS:
            self.records_dead_lettered.labels(reason)
