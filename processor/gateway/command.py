"""``telemetry-processor gateway``: parse the configuration, set up logging and signals, run, exit.

Exit status: 0 after a clean stop, 1 if the stop outlasted SHUTDOWN_TIMEOUT_S, 2 for a bad configuration
(one line on stderr naming the variable and what it accepts), as the processor's ``run``.
"""

from __future__ import annotations

import logging
import sys

from ..core.errors import ConfigError
from ..core.logs import setup_logging
from ..core.redact import register_secrets
from ..core.stop import StopEvent, install_signal_handlers
from .config import SPEC, GatewayConfig, load_gateway_config

EXIT_CONFIG = 2


def env_help() -> str:
    defaults = GatewayConfig()
    lines = ["gateway variables (CONTRACT 9), besides the shared REDIS_URL, POSTGRES_URL, STREAM_KEY, BLOCK_MS,",
             "DEVICE_STATE_MAX, MAX_PAYLOAD_BYTES, MAX_FUTURE_SKEW_S, LOG_LEVEL, LOG_FORMAT, SHUTDOWN_TIMEOUT_S:"]
    for name, (attr, _, accepts) in SPEC.items():
        default = getattr(defaults, attr)
        shown = ",".join(default) if isinstance(default, tuple) else str(default).lower() \
            if isinstance(default, bool) else default
        lines.append(f"  {name:<24} {accepts}; default {shown!r}" if shown != "" else
                     f"  {name:<24} {accepts}; default empty")
    return "\n".join(lines)


def main() -> int:
    try:
        config = load_gateway_config()
    except ConfigError as exc:
        print(f"telemetry-processor gateway: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    register_secrets(config.core.redis_url, config.core.postgres_url)
    setup_logging(config.core.log_level, config.core.log_format)
    # websockets logs every refused handshake and every plain HTTP answer at info: keep its warnings only.
    logging.getLogger("websockets").setLevel(logging.WARNING)
    stop = StopEvent()
    install_signal_handlers(stop, timeout_s=config.core.shutdown_timeout_s)
    try:
        from .server import Gateway
    except ImportError as exc:
        print(f"telemetry-processor gateway: {exc}: install the gateway extra "
              "(pip install 'telemetry-processor[gateway]')", file=sys.stderr)
        return 1
    return Gateway(config, stop=stop).run()
