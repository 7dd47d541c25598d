"""The gateway's Prometheus metrics (all ``gateway_`` prefixed), on an injected registry.

No label carries a device id, a user or a client: ``reason``, ``code`` and ``where`` take a few fixed values.

``entry_to_send_seconds``: per update frame handed to a client's connection, the time since the
stream-entry id of the oldest position it holds (the worst of its positions). Buckets from 5 ms (one
flush of 100 ms makes most updates wait 0-100 ms) to 60 s (a client that lags until it is closed).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

from ..core.types import REASONS

SEND_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.15, 0.2, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
REFUSALS = ("max_clients", "origin")
AUTH_CODES = ("INVALID_CREDENTIALS", "TOKEN_EXPIRED")
COALESCED_WHERE = ("flush", "slow_client")


class GatewayMetrics:
    def __init__(self, *, registry: CollectorRegistry | None = None, version: str = "") -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r, p = self.registry, "gateway_"
        self.clients = Gauge(p + "clients", "Open WebSocket connections (authenticating or authenticated)",
                             registry=r)
        self.subscriptions = Gauge(p + "subscriptions", "Subscriptions held by clients", registry=r)
        self.subscription_groups = Gauge(p + "subscription_groups",
                                         "Distinct subscriptions (uid, filter, scope): each update is encoded "
                                         "once per group", registry=r)
        self.updates_sent = Counter(p + "updates_sent", "Subscription messages (init and update) sent to clients",
                                    registry=r)
        self.positions_sent = Counter(p + "positions_sent", "Positions sent to clients, summed over clients",
                                      registry=r)
        self.bytes_sent = Counter(p + "bytes_sent", "Payload bytes of subscription messages sent", registry=r)
        self.updates_encoded = Counter(p + "updates_encoded", "Update messages encoded (once per group and flush, "
                                       "or once per catch-up of a client that fell behind)", registry=r)
        self.positions_coalesced = Counter(p + "positions_coalesced", "Positions superseded before they were "
                                           "sent: by a newer one of the same device before the flush, or in a "
                                           "held-back update replaced by a catch-up", ["where"], registry=r)
        self.slow_clients_closed = Counter(p + "slow_clients_closed", "Clients closed (1013) for not draining "
                                           "their updates for GATEWAY_SLOW_CLIENT_S", registry=r)
        self.connections_refused = Counter(p + "connections_refused", "Connections refused, by reason",
                                           ["reason"], registry=r)
        self.auth_failures = Counter(p + "auth_failures", "Authentications refused, by error code", ["code"],
                                     registry=r)
        self.invalid_messages = Counter(p + "invalid_messages", "Client messages answered with INVALID_PAYLOAD",
                                        registry=r)
        self.entries_read = Counter(p + "entries_read", "Stream entries read (XREAD)", registry=r)
        self.entries_rejected = Counter(p + "entries_rejected", "Stream entries the decoder rejected (skipped)",
                                        ["reason"], registry=r)
        self.positions_stale = Counter(p + "positions_stale", "Positions not newer than their device's latest "
                                       "(counted, not kept: forward-only)", registry=r)
        self.devices_tracked = Gauge(p + "devices_tracked", "Devices with a latest position", registry=r)
        self.stream_lag = Gauge(p + "stream_lag_seconds", "Id time of the stream's newest entry minus that of "
                                "the last entry read (0 when caught up)", registry=r)
        self.entry_to_send_seconds = Histogram(p + "entry_to_send_seconds", "Send time of an update minus the "
                                               "entry-id time of its oldest position", buckets=SEND_BUCKETS,
                                               registry=r)
        self.snapshot_positions = Gauge(p + "snapshot_positions", "Devices loaded from positions at start-up",
                                        registry=r)
        self.redis_errors = Counter(p + "redis_errors", "Redis operations that failed", registry=r)
        self.postgres_errors = Counter(p + "postgres_errors", "PostgreSQL operations that failed", registry=r)
        self.ready = Gauge(p + "ready", "1 when the snapshot is loaded and the last Redis read succeeded "
                           "(as /readyz), else 0", registry=r)
        self.info = Info("gateway", "Gateway build information", registry=r)
        self.info.info({"version": version})
        for reason in REFUSALS:
            self.connections_refused.labels(reason)
        for code in AUTH_CODES:
            self.auth_failures.labels(code)
        for where in COALESCED_WHERE:
            self.positions_coalesced.labels(where)
        for reason in REASONS:
            self.entries_rejected.labels(reason)
