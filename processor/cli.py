"""Command line (CONTRACT 6): parse, validate, build, run.

    python processor.py [run]            the service (default)
    python processor.py migrate          apply schema.sql and exit
    python processor.py replay [...]     process entries stuck pending (for cron)
    python processor.py dead-letters ... list or redrive dead letters
    python processor.py simulate [...]   publish synthetic positions
    python processor.py gateway          the live gateway (CONTRACT 9; processor.gateway)
"""

from __future__ import annotations

import argparse
import logging
import sys
import threading
from typing import Sequence

from . import __version__
from .core.config import _SPEC, Config, load_config
from .core.errors import ConfigError, ProcessorError, TransientError
from .core.logs import setup_logging
from .core.stop import StopEvent, install_signal_handlers
from .core.redact import redact, register_secrets

log = logging.getLogger("processor")

EXIT_CONFIG = 2


def _env_help() -> str:
    defaults = Config()
    lines = ["environment variables (also read from ./.env; the real environment wins):"]
    for name, (field, _, accepts) in _SPEC.items():
        shown = "the host name" if field == "consumer_name" else _as_written(getattr(defaults, field))
        lines.append(f"  {name:<22} {accepts}; default {shown}")
    return "\n".join(lines)


def _as_written(value: object) -> str:
    """A default as one would write it in the environment (and as the README shows it): true, 15."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return redact(value)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="telemetry-processor",
        description="Moves GPS positions from a Redis Stream into PostgreSQL/TimescaleDB; nothing is lost.",
        epilog=_env_help(), formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"telemetry-processor {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.add_parser("run", help="run the service (the default)")
    sub.add_parser("migrate", help="apply schema.sql to POSTGRES_URL and exit")
    rp = sub.add_parser("replay", help="claim and process entries pending too long on any consumer (for cron)")
    rp.add_argument("--min-idle-ms", type=_non_negative, default=None,
                    help="claim entries idle at least this long (default: RECLAIM_IDLE_MS)")
    rp.add_argument("--limit", type=_positive, default=None, help="claim at most this many entries")
    rp.add_argument("--dry-run", action="store_true", help="only count the entries that would be claimed")
    dl = sub.add_parser("dead-letters", help="list or redrive dead letters")
    dsub = dl.add_subparsers(dest="dl_command", metavar="ACTION", required=True)
    dls = dsub.add_parser("list", help="show dead letters, oldest first")
    dls.add_argument("--limit", type=_positive, default=20)
    drd = dsub.add_parser("redrive", help="move dead letters back onto the stream and remove them")
    drd.add_argument("--reason", default=None, help="only dead letters with this reason code")
    drd.add_argument("--limit", type=_positive, default=None, help="move at most this many")
    sim = sub.add_parser("simulate", help="publish realistic synthetic positions to the stream")
    sim.add_argument("--devices", type=_positive, default=100, help="number of moving trackers (default 100)")
    sim.add_argument("--rate", type=_positive_float, default=None,
                     help="positions per second (default: as fast as possible)")
    sim.add_argument("--duration", type=_positive_float, default=None, help="stop after this many seconds")
    sim.add_argument("--count", type=_positive, default=None, help="stop after this many positions")
    sim.add_argument("--seed", type=int, default=None, help="random seed, for a repeatable fleet")
    from .gateway.command import env_help as gateway_env_help

    sub.add_parser("gateway", help="the live gateway: positions from the stream to WebSocket clients and a map",
                   epilog=gateway_env_help(), formatter_class=argparse.RawDescriptionHelpFormatter)
    return parser


def _positive(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text!r}")
    return value


def _non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a non-negative integer, got {text!r}")
    return value


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "gateway":  # its own configuration and process (CONTRACT 9)
        from .gateway.command import main as gateway_main

        return gateway_main()
    try:
        config = load_config()
    except ConfigError as exc:
        print(f"telemetry-processor: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    register_secrets(config.redis_url, config.postgres_url)
    setup_logging(config.log_level, config.log_format)
    command = args.command or "run"
    stop = StopEvent()
    install_signal_handlers(stop, timeout_s=config.shutdown_timeout_s)
    try:
        if command == "run":
            return _run(config, stop)
        if command == "migrate":
            return _migrate(config, stop)
        if command == "replay":
            return _replay(config, args, stop)
        if command == "dead-letters":
            return _dead_letters(config, args)
        if command == "simulate":
            return _simulate(config, args, stop)
    except ProcessorError as exc:
        log.error("%s failed: %s", command, exc)
        return 1
    raise AssertionError(command)


def _run(config: Config, stop: threading.Event) -> int:
    from .service import Service

    return Service(config, stop=stop).run()


def _migrate(config: Config, stop: threading.Event) -> int:
    from .core import db

    try:
        conn = db.connect(config.postgres_url)
        try:
            if not db.migrate(conn, stop=stop):
                log.error("migrate stopped while waiting for the migration lock; nothing applied")
                return 1
        finally:
            conn.close()
    except TransientError as exc:
        log.error("migrate failed: cannot reach PostgreSQL: %s", exc)
        return 1
    except Exception as exc:  # a broken schema or a missing privilege: say it in one line
        log.error("migrate failed: %s", redact(" ".join(str(exc).split())))
        return 1
    return 0


def _replay(config: Config, args: argparse.Namespace, stop: threading.Event) -> int:
    from .service import replay

    min_idle = config.reclaim_idle_ms if args.min_idle_ms is None else args.min_idle_ms
    # A page whose writes cannot finish within SHUTDOWN_TIMEOUT_S is given up (exit 1; still pending).
    summary = replay(config, min_idle_ms=min_idle, limit=args.limit, dry_run=args.dry_run, stop=stop,
                     page_timeout_s=config.shutdown_timeout_s)
    print(summary.line(), flush=True)
    return 0 if summary.settled else 1


def _dead_letters(config: Config, args: argparse.Namespace) -> int:
    from .core.consumer import redis_client
    from .core.deadletter import DeadLetters

    client = redis_client(config.redis_url, block_ms=config.block_ms)
    letters = DeadLetters(client=client, stream=config.dead_letter_stream, source_stream=config.stream_key,
                          group=config.consumer_group)
    try:
        if args.dl_command == "list":
            shown = letters.list(args.limit)
            for d in shown:
                f = d.fields
                print(f"{d.dead_id} reason={f.get('reason')} source_id={f.get('source_id')} "
                      f"deliveries={f.get('deliveries')} at={f.get('dead_lettered_at')} "
                      f"detail={f.get('detail')!r} payload={d.payload[:120]!r}")
            print(f"{len(shown)} shown of {letters.count()} dead letters in {config.dead_letter_stream}")
            return 0

        def progress(moved: int, scanned: int) -> None:
            print(f"redrive: moved {moved} (scanned {scanned})", file=sys.stderr, flush=True)

        moved, scanned = letters.redrive(reason=args.reason, limit=args.limit, progress=progress)
        print(f"redrive: moved {moved} dead letters to {config.stream_key} (scanned {scanned})")
        return 0
    finally:
        client.close()


def _simulate(config: Config, args: argparse.Namespace, stop: threading.Event) -> int:
    from .core.consumer import redis_client
    from .simulate import run_simulation

    client = redis_client(config.redis_url, block_ms=config.block_ms)
    try:
        run_simulation(client, config.stream_key, devices=args.devices, rate=args.rate, duration=args.duration,
                       count=args.count, stop=stop, progress=lambda line: print(line, file=sys.stderr, flush=True),
                       seed=args.seed)
    finally:
        client.close()
    return 0
