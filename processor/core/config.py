"""Configuration (CONTRACT 3): read once at start-up, validated, passed in.

Nothing here runs at import time. :func:`load_config` takes the environment as
an argument; ``.env`` in the working directory is read too, and the real
environment wins over it.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, fields
from typing import Callable, Mapping
from urllib.parse import urlsplit

from .errors import ConfigError
from .redact import redact

LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
LOG_FORMATS = ("json", "text")


@dataclass(frozen=True)
class Config:
    redis_url: str = "redis://localhost:6379/0"
    postgres_url: str = "postgresql://postgres@localhost:5432/postgres"
    stream_key: str = "telemetry:t"
    consumer_group: str = "processor"
    consumer_name: str = ""  # filled with the host name by load_config
    batch_size: int = 1000
    block_ms: int = 1000
    writer_threads: int = 2
    max_inflight_batches: int = 4
    device_state_max: int = 100_000
    reclaim_idle_ms: int = 60_000
    max_deliveries: int = 5
    dead_letter_stream: str = "telemetry:t:dead"
    max_payload_bytes: int = 65_536
    max_future_skew_s: int = 86_400
    metrics_host: str = "0.0.0.0"
    metrics_port: int = 9464
    log_level: str = "info"
    log_format: str = "json"
    shutdown_timeout_s: float = 15.0
    migrate_on_start: bool = True

    def describe(self) -> dict[str, object]:
        """The configuration as shown to an operator: URLs with their credentials masked."""
        return {f.name: (redact(v) if f.name.endswith("_url") else v)
                for f in fields(self) for v in [getattr(self, f.name)]}


# --- parsers: each returns the value or raises ValueError with "what it accepts" ---

def _positive_int(raw: str) -> int:
    value = int(raw.strip())
    if value <= 0:
        raise ValueError
    return value


def _non_negative_int(raw: str) -> int:
    value = int(raw.strip())
    if value < 0:
        raise ValueError
    return value


def _port(raw: str) -> int:
    value = int(raw.strip())
    if not 0 <= value <= 65535:
        raise ValueError
    return value


def _positive_float(raw: str) -> float:
    value = float(raw.strip())
    if not value > 0 or value == float("inf"):
        raise ValueError
    return value


def _non_empty(raw: str) -> str:
    if not raw.strip():
        raise ValueError
    return raw.strip()


def _choice(options: tuple[str, ...]) -> Callable[[str], str]:
    def parse(raw: str) -> str:
        value = raw.strip().lower()
        if value not in options:
            raise ValueError
        return value
    return parse


def _boolean(raw: str) -> bool:
    value = raw.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ValueError


def _url(schemes: tuple[str, ...]) -> Callable[[str], str]:
    def parse(raw: str) -> str:
        value = raw.strip()
        parts = urlsplit(value)
        if parts.scheme not in schemes or not (parts.hostname or parts.path or parts.query):
            raise ValueError
        return value
    return parse


# variable -> (Config field, parser, what it accepts)
_SPEC: dict[str, tuple[str, Callable[[str], object], str]] = {
    "REDIS_URL": ("redis_url", _url(("redis", "rediss", "unix")), "a redis://, rediss:// or unix:// URL"),
    "POSTGRES_URL": ("postgres_url", _url(("postgresql", "postgres")), "a postgresql:// URL"),
    "STREAM_KEY": ("stream_key", _non_empty, "a non-empty stream key"),
    "CONSUMER_GROUP": ("consumer_group", _non_empty, "a non-empty group name"),
    "CONSUMER_NAME": ("consumer_name", _non_empty, "a non-empty consumer name"),
    "BATCH_SIZE": ("batch_size", _positive_int, "a positive integer"),
    "BLOCK_MS": ("block_ms", _positive_int, "a positive integer (milliseconds)"),
    "WRITER_THREADS": ("writer_threads", _positive_int, "a positive integer"),
    "MAX_INFLIGHT_BATCHES": ("max_inflight_batches", _positive_int, "a positive integer"),
    "DEVICE_STATE_MAX": ("device_state_max", _positive_int, "a positive integer"),
    "RECLAIM_IDLE_MS": ("reclaim_idle_ms", _positive_int, "a positive integer (milliseconds)"),
    "MAX_DELIVERIES": ("max_deliveries", _positive_int, "a positive integer"),
    "DEAD_LETTER_STREAM": ("dead_letter_stream", _non_empty, "a non-empty stream key"),
    "MAX_PAYLOAD_BYTES": ("max_payload_bytes", _positive_int, "a positive integer (bytes)"),
    "MAX_FUTURE_SKEW_S": ("max_future_skew_s", _non_negative_int, "a non-negative integer (seconds)"),
    "METRICS_HOST": ("metrics_host", _non_empty, "a host name or address to bind"),
    "METRICS_PORT": ("metrics_port", _port, "an integer from 0 to 65535 (0 disables the server)"),
    "LOG_LEVEL": ("log_level", _choice(LOG_LEVELS), "one of " + ", ".join(LOG_LEVELS)),
    "LOG_FORMAT": ("log_format", _choice(LOG_FORMATS), "one of " + ", ".join(LOG_FORMATS)),
    "SHUTDOWN_TIMEOUT_S": ("shutdown_timeout_s", _positive_float, "a positive number (seconds)"),
    "MIGRATE_ON_START": ("migrate_on_start", _boolean, "true or false"),
}

VARIABLES: tuple[str, ...] = tuple(_SPEC)


def _read_dotenv(path: str) -> dict[str, str]:
    if not os.path.isfile(path):
        return {}
    from dotenv import dotenv_values

    return {k: v for k, v in dotenv_values(path).items() if v is not None}


def load_config(environ: Mapping[str, str] | None = None, *, dotenv_path: str | None = ".env") -> Config:
    """Build the :class:`Config` from ``environ`` (default ``os.environ``) over ``.env``.

    Raises :class:`ConfigError` with one line naming the variable and what it accepts.
    """
    env = dict(_read_dotenv(dotenv_path)) if dotenv_path else {}
    env.update(os.environ if environ is None else environ)
    values: dict[str, object] = {}
    for name, (field, parse, accepts) in _SPEC.items():
        raw = env.get(name)
        if raw is None or (raw == "" and name != "CONSUMER_NAME"):
            continue
        try:
            values[field] = parse(raw)
        except (ValueError, TypeError):
            shown = redact(raw) if name.endswith("_URL") else raw
            raise ConfigError(f"{name} must be {accepts}, got {shown!r}") from None
    values.setdefault("consumer_name", socket.gethostname() or "processor")
    return Config(**values)  # type: ignore[arg-type]
