"""The gateway's configuration (CONTRACT 9, with the rules of CONTRACT 3): read once, validated, passed in.

The shared variables (REDIS_URL, POSTGRES_URL, STREAM_KEY, DEVICE_STATE_MAX, MAX_PAYLOAD_BYTES,
MAX_FUTURE_SKEW_S, BLOCK_MS, LOG_*, SHUTDOWN_TIMEOUT_S) come from the processor's own loader, so they
mean and accept the same; the GATEWAY_* ones are read here the same way. A bad value raises
:class:`ConfigError` with one line naming the variable and what it accepts (exit status 2).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Callable, Mapping
from urllib.parse import urlsplit

from ..core.config import Config, _boolean, _non_empty, _port, _positive_float, _positive_int, _read_dotenv, \
    load_config
from ..core.errors import ConfigError

AUTH_TIMEOUT_S = 5.0  # CONTRACT 9: the auth message must come within 5 s
MAX_FRAME_BYTES = 64 * 1024  # CONTRACT 9: a bigger frame closes the connection with 1009


def _origins(raw: str) -> tuple[str, ...]:
    out = []
    for item in raw.split(","):
        item = item.strip().rstrip("/")
        if not item:
            continue
        parts = urlsplit(item)
        if parts.scheme not in ("http", "https") or not parts.hostname or parts.path or parts.query:
            raise ValueError
        out.append(item.lower())
    return tuple(out)


def _tile_url(raw: str) -> str:
    value = raw.strip()
    if value and (urlsplit(value).scheme not in ("http", "https") or "{z}" not in value
                  or "{x}" not in value or "{y}" not in value):
        raise ValueError
    return value


def _secret(raw: str) -> str:
    if not raw:
        raise ValueError
    return raw  # as given: a key's spaces are part of it


@dataclass(frozen=True)
class GatewayConfig:
    core: Config = field(default_factory=Config)
    host: str = "0.0.0.0"
    port: int = 8765
    token_secret: str = ""
    token_issuer: str = "directus"
    public: bool = False
    allowed_origins: tuple[str, ...] = ()
    flush_ms: int = 100
    max_clients: int = 10_000
    slow_client_s: float = 10.0
    snapshot_hours: float = 24.0
    tile_url: str = ""

    def describe(self) -> dict[str, object]:
        """As shown to an operator: the key never, the URLs masked."""
        shown: dict[str, object] = {k: getattr(self, k) for k in self.__dataclass_fields__ if k != "core"}
        shown["token_secret"] = "***" if self.token_secret else ""
        return {**self.core.describe(), **shown}


# variable -> (GatewayConfig field, parser, what it accepts)
SPEC: dict[str, tuple[str, Callable[[str], object], str]] = {
    "GATEWAY_HOST": ("host", _non_empty, "a host name or address to bind"),
    "GATEWAY_PORT": ("port", _port, "an integer from 0 to 65535"),
    "GATEWAY_TOKEN_SECRET": ("token_secret", _secret, "the HS256 key tokens are signed with (Directus's SECRET)"),
    "GATEWAY_TOKEN_ISSUER": ("token_issuer", _non_empty, "a non-empty issuer (the tokens' iss claim)"),
    "GATEWAY_PUBLIC": ("public", _boolean, "true or false"),
    "GATEWAY_ALLOWED_ORIGINS": ("allowed_origins", _origins,
                                "a comma-separated list of origins such as https://map.example.com"),
    "GATEWAY_FLUSH_MS": ("flush_ms", _positive_int, "a positive integer (milliseconds)"),
    "GATEWAY_MAX_CLIENTS": ("max_clients", _positive_int, "a positive integer"),
    "GATEWAY_SLOW_CLIENT_S": ("slow_client_s", _positive_float, "a positive number (seconds)"),
    "GATEWAY_SNAPSHOT_HOURS": ("snapshot_hours", _positive_float, "a positive number (hours)"),
    "GATEWAY_TILE_URL": ("tile_url", _tile_url, "an http(s) URL template with {z}, {x} and {y}, or empty"),
}

VARIABLES: tuple[str, ...] = tuple(SPEC)
# May be empty: an empty value means the default's meaning (no origins listed, no tiles).
_EMPTY_OK = {"GATEWAY_ALLOWED_ORIGINS", "GATEWAY_TILE_URL"}


def load_gateway_config(environ: Mapping[str, str] | None = None, *,
                        dotenv_path: str | None = ".env") -> GatewayConfig:
    """Build the :class:`GatewayConfig` from ``environ`` (default ``os.environ``) over ``.env``."""
    env = dict(_read_dotenv(dotenv_path)) if dotenv_path else {}
    env.update(os.environ if environ is None else environ)
    core = load_config(env, dotenv_path=None)
    values: dict[str, object] = {"core": core}
    for name, (attr, parse, accepts) in SPEC.items():
        raw = env.get(name)
        if raw is None or (raw == "" and name not in _EMPTY_OK):
            continue
        try:
            values[attr] = parse(raw)
        except (ValueError, TypeError):
            shown = "***" if name == "GATEWAY_TOKEN_SECRET" else raw
            raise ConfigError(f"{name} must be {accepts}, got {shown!r}") from None
    config = GatewayConfig(**values)  # type: ignore[arg-type]
    if not config.public and not config.token_secret:
        raise ConfigError("GATEWAY_TOKEN_SECRET must be set (the HS256 key Directus signs tokens with) "
                          "unless GATEWAY_PUBLIC=true")
    return config
