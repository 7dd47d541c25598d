"""The gateway process: HTTP and WebSocket on one port (websockets' asyncio server), the flush loop, the stop.

One event loop serves every client (measured against websockets' threading server at 1,000 clients:
docs/gateway.md); the stream is read by one thread (:class:`StreamReader`). Per connection: the
client limit (1013), the origin check (403 before the upgrade), authentication (a token on the URL
or an auth message within 5 s; 1008 when refused), then subscribe/unsubscribe messages. Every
GATEWAY_FLUSH_MS the flush loop takes the devices changed since the last flush, builds each group's
update once (its frames too, :mod:`processor.gateway.frames`), offers it to the group's clients (written
at once to those with nothing unsent), and closes the clients that have not drained their updates for
GATEWAY_SLOW_CLIENT_S (1013). permessage-deflate is negotiated without context takeover, so that a
message is compressed once for all the clients that negotiated it.

Stop sequence (:meth:`Gateway._shutdown`), under SHUTDOWN_TIMEOUT_S: close the listening socket and
every connection (1001, going away), stop the stream reader (within BLOCK_MS), close Redis.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from http import HTTPStatus
from typing import Any, Mapping
from urllib.parse import parse_qs, urlsplit

import redis
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from websockets.asyncio.server import ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from .. import __version__
from ..core import db
from ..core.consumer import redis_client, translate
from ..core.decode import Decoder
from ..core.errors import TransientError
from ..core.health import Health
from ..core.redact import redact
from ..core.stop import deadline as stop_deadline
from ..domain.visibility import Visibility, default_visibility
from . import protocol
from .auth import LEEWAY_S, AuthError, TokenVerifier
from .clients import Client, account
from .config import AUTH_TIMEOUT_S, MAX_FRAME_BYTES, GatewayConfig
from .frames import deflate_extension
from .latest import Fix, LatestPositions
from .metrics import GatewayMetrics
from .page import content_security_policy, page_html
from .source import StreamReader, last_entry_id, load_snapshot
from .subscriptions import Filter, Registry

log = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_UNCLEAN = 1
PING_INTERVAL_S = 20.0  # keepalive: a WebSocket ping every 20 s, closed if no pong within 20 s
CLOSE_TIMEOUT_S = 3.0
STOP_POLL_S = 0.1
CLOSE_SLOW = 1013  # "try again later": also the code for a refused connection over the limit
CLOSE_POLICY = 1008


class Gateway:
    def __init__(self, config: GatewayConfig, *, stop: threading.Event, registry: CollectorRegistry | None = None,
                 visibility: Visibility | None = None) -> None:
        self.config = config
        self.stop_event = stop
        self.metrics = GatewayMetrics(registry=registry, version=__version__)
        self.health = Health(block_ms=config.core.block_ms)
        self.health.postgres_result("snapshot not loaded yet")
        self.visibility = visibility if visibility is not None else default_visibility(config)
        self.verifier = None if config.public else TokenVerifier(secret=config.token_secret,
                                                                 issuer=config.token_issuer)
        self.latest = LatestPositions(max_devices=config.core.device_state_max)
        # A group remembers its changes for as many flushes as the slow-client limit spans (and some):
        # a member further behind is closed anyway.
        self.registry = Registry(keep_gens=int(config.slow_client_s * 1000 / config.flush_ms) + 10)
        self.clients: set[Client] = set()
        self.connections = 0
        self.accepting = False  # /ws answers 503 until the snapshot is in and the reader runs
        self.redis: redis.Redis | None = None
        self.reader: StreamReader | None = None
        self.port: int | None = None
        self._page = page_html(tile_url=config.tile_url, public=config.public)
        self._csp = content_security_policy(config.tile_url)

    # --- run ---

    def run(self) -> int:
        return asyncio.run(self._main())

    async def _main(self) -> int:
        cfg = self.config
        log.info("gateway starting", extra={"version": __version__})
        server = await serve(self._handle, cfg.host, cfg.port, process_request=self._http, compression=None,
                             extensions=[deflate_extension()],
                             max_size=MAX_FRAME_BYTES, ping_interval=PING_INTERVAL_S, ping_timeout=PING_INTERVAL_S,
                             close_timeout=CLOSE_TIMEOUT_S, server_header=None)
        self.port = next(iter(server.sockets)).getsockname()[1]
        log.info("gateway listening on http://%s:%d/ (WebSocket /ws)", cfg.host, self.port)
        flush = None
        try:
            if await asyncio.to_thread(self._start_source):
                self.accepting = True
                flush = asyncio.create_task(self._flush_loop())
                log.info("gateway ready")
            while not self.stop_event.is_set():
                await asyncio.sleep(STOP_POLL_S)
                if flush is None:
                    self.health.turned()
        finally:
            status = await self._shutdown(server, flush)
        return status

    def _start_source(self) -> bool:
        """Redis, the stream's last id, the snapshot, the reader thread (blocking: run off the loop)."""
        cfg, stop = self.config.core, self.stop_event
        client = redis_client(cfg.redis_url, block_ms=cfg.block_ms)
        self.redis = client
        def first_contact() -> str:
            translate("PING", client.ping)
            return last_entry_id(client, cfg.stream_key)

        start_id = db.retry("connect to Redis", first_contact, stop=stop, tick=self.health.turned,
                            on_error=self._redis_failed)
        if start_id is None:
            return False
        self.health.redis_result(None)
        log.info("Redis connected; stream %s ends at id %s", cfg.stream_key, start_id)
        t0 = time.perf_counter()
        fixes = db.retry("load the snapshot from PostgreSQL", lambda: load_snapshot(
            cfg.postgres_url, self.config.snapshot_hours), stop=stop, tick=self.health.turned,
            on_error=self._postgres_failed)
        if fixes is None:
            return False
        self.latest.apply(fixes, mark_changed=False)
        self.health.postgres_result(None)
        self.metrics.snapshot_positions.set(len(fixes))
        self.metrics.devices_tracked.set(len(self.latest))
        log.info("snapshot loaded: %d devices from positions (last %g h) in %.2fs", len(fixes),
                 self.config.snapshot_hours, time.perf_counter() - t0)
        self.reader = StreamReader(client=client, stream=cfg.stream_key, start_id=start_id,
                                   decoder=Decoder(max_payload_bytes=cfg.max_payload_bytes,
                                                   max_future_skew_s=cfg.max_future_skew_s),
                                   latest=self.latest, metrics=self.metrics, health=self.health, stop=stop,
                                   block_ms=cfg.block_ms)
        self.reader.start()
        log.info("reading stream %s from id %s", cfg.stream_key, start_id)
        return True

    def _redis_failed(self, exc: TransientError) -> None:
        self.metrics.redis_errors.inc()
        self.health.redis_result(str(exc))

    def _postgres_failed(self, exc: TransientError) -> None:
        self.metrics.postgres_errors.inc()
        self.health.postgres_result(str(exc))

    # --- the flush loop ---

    async def _flush_loop(self) -> None:
        loop = asyncio.get_running_loop()
        interval = self.config.flush_ms / 1000
        next_at = loop.time()
        while True:
            next_at += interval
            delay = next_at - loop.time()
            if delay < 0:  # fell behind (a long flush): keep the pace, do not burst
                next_at, delay = loop.time(), 0
            await asyncio.sleep(delay)
            try:
                self.flush()
                self._close_slow_clients()
            except Exception:  # a bug of ours must not end the updates for everyone
                log.exception("flush failed")
            if self.reader is not None and self.reader.alive():
                self.health.turned()
            ok, _ = self._ready()
            self.metrics.ready.set(1 if ok else 0)

    def flush(self) -> None:
        changed = self.latest.take_changed()
        if not changed:
            return
        for group, update in self.registry.updates(changed):
            self.metrics.updates_encoded.inc()
            uid, written, nbytes = group.uid, 0, 0
            for client in group.members:
                n = client.offer(uid, update)
                if n:
                    written += 1
                    nbytes += n
            if written:
                account(self.metrics, update, written, nbytes, time.time())

    def _close_slow_clients(self) -> None:
        limit = self.config.slow_client_s
        now = time.monotonic()
        for client in self.clients:
            since = client.backlog_since
            if since is not None and not client.closing and now - since > limit:
                client.abandon()
                self.metrics.slow_clients_closed.inc()
                log.warning("closing a slow client: its updates were not drained for %.0fs",
                            now - since, extra={"remote": _remote(client.conn)})
                asyncio.create_task(client.conn.close(CLOSE_SLOW, f"slow client: updates not drained for {limit:g} s"))

    # --- HTTP: /, /metrics, /healthz, /readyz; /ws goes on to the WebSocket handshake ---

    def _http(self, conn: ServerConnection, request: Request) -> Response | None:
        path = urlsplit(request.path).path
        if path == "/ws":
            if not self.accepting:
                return _response(503, b"starting: the snapshot is not loaded yet\n")
            if not self._origin_allowed(request.headers):
                self.metrics.connections_refused.labels("origin").inc()
                return _response(403, b"origin not allowed\n")
            return None
        if path == "/":
            return _response(200, self._page, "text/html; charset=utf-8",
                             [("Content-Security-Policy", self._csp), ("Cache-Control", "no-cache"),
                              ("X-Content-Type-Options", "nosniff"), ("Referrer-Policy", "no-referrer")])
        if path == "/metrics":
            self.metrics.ready.set(1 if self._ready()[0] else 0)
            return _response(200, generate_latest(self.metrics.registry), CONTENT_TYPE_LATEST)
        if path == "/healthz":
            ok, why = self.health.alive()
            return _response(200 if ok else 503, (why + "\n").encode())
        if path == "/readyz":
            ok, why = self._ready()
            return _response(200 if ok else 503, (redact(why) + "\n").encode())
        return _response(404, b"not found: try /, /ws, /metrics, /healthz or /readyz\n")

    def _ready(self) -> tuple[bool, str]:
        """Ready once /ws accepts connections: the snapshot is in, the reader runs and Redis answers."""
        ok, why = self.health.ready()
        if ok and not self.accepting:
            return False, "starting: the stream reader is not running yet"
        return ok, why

    def _origin_allowed(self, headers: Headers) -> bool:
        """No Origin (not a browser) passes; else one of GATEWAY_ALLOWED_ORIGINS, or the same origin when empty."""
        origin = headers.get("Origin")
        if origin is None:
            return True
        origin = origin.strip().rstrip("/").lower()
        if self.config.allowed_origins:
            return origin in self.config.allowed_origins
        parts = urlsplit(origin)
        host = (headers.get("Host") or "").strip().lower()
        return parts.scheme in ("http", "https") and bool(host) and parts.netloc == host

    # --- one connection ---

    async def _handle(self, conn: ServerConnection) -> None:
        if self.connections >= self.config.max_clients:
            self.metrics.connections_refused.labels("max_clients").inc()
            await conn.close(CLOSE_SLOW, "too many clients")
            return
        self.connections += 1
        self.metrics.clients.inc()
        client: Client | None = None
        try:
            claims = await self._authenticate(conn)
            if claims is None:
                return
            client = Client(conn, scope=self.visibility.scope(claims), metrics=self.metrics, initial=self._initial)
            self.clients.add(client)
            self._expire_at(client, claims)
            writer = asyncio.create_task(client.run_writer())
            try:
                async for frame in conn:
                    await self._on_message(client, frame)
            finally:
                writer.cancel()
        except ConnectionClosed:
            pass
        finally:
            self.connections -= 1
            self.metrics.clients.dec()
            if client is not None:
                self._forget(client)

    async def _authenticate(self, conn: ServerConnection) -> Mapping[str, Any] | None:
        """The token's claims (empty in public mode), or None after refusing the connection."""
        if self.verifier is None:
            return {}
        query = parse_qs(urlsplit(conn.request.path).query) if conn.request is not None else {}
        if query.get("access_token"):
            return await self._verify(conn, query["access_token"][0])
        loop = asyncio.get_running_loop()
        deadline = loop.time() + AUTH_TIMEOUT_S
        while True:
            try:
                async with asyncio.timeout_at(deadline):
                    frame = await conn.recv()
            except TimeoutError:
                await self._refuse(conn, protocol.INVALID_CREDENTIALS,
                                   f"No auth message within {AUTH_TIMEOUT_S:g} s.")
                return None
            try:
                message = protocol.parse(frame)
            except protocol.ProtocolError as exc:
                self.metrics.invalid_messages.inc()
                await conn.send(protocol.error(str(exc)), text=True)
                continue
            if isinstance(message, protocol.Auth):
                return await self._verify(conn, message.access_token)
            await self._refuse(conn, protocol.INVALID_CREDENTIALS, "Authenticate first: send an auth message.")
            return None

    async def _verify(self, conn: ServerConnection, token: str,
                      client: Client | None = None) -> Mapping[str, Any] | None:
        assert self.verifier is not None
        try:
            claims = self.verifier.verify(token)
        except AuthError as exc:
            await self._refuse(conn, exc.code, exc.message, client)
            return None
        await self._reply(conn, client, protocol.AUTH_OK)
        return claims

    async def _refuse(self, conn: ServerConnection, code: str, message: str, client: Client | None = None) -> None:
        self.metrics.auth_failures.labels(code).inc()
        try:
            await self._reply(conn, client, protocol.auth_error(code, message))
            await conn.close(CLOSE_POLICY, message[:100])
        except ConnectionClosed:
            pass

    @staticmethod
    async def _reply(conn: ServerConnection, client: Client | None, payload: bytes) -> None:
        """Once a client exists, its writer sends everything (never inside a fragmented update)."""
        if client is None:
            await conn.send(payload, text=True)
        else:
            await client.reply(payload)

    def _expire_at(self, client: Client, claims: Mapping[str, Any]) -> None:
        """When the token expires, the connection ends with TOKEN_EXPIRED unless a new auth came first."""
        if client.expiry is not None:
            client.expiry.cancel()
        exp = claims.get("exp")
        if not isinstance(exp, (int, float)):
            return
        loop = asyncio.get_running_loop()
        delay = max(0.0, exp + LEEWAY_S - time.time())
        client.expiry = loop.call_later(delay, lambda: asyncio.ensure_future(
            self._refuse(client.conn, protocol.TOKEN_EXPIRED, "Token expired.", client)))

    async def _on_message(self, client: Client, frame: str | bytes) -> None:
        try:
            message = protocol.parse(frame)
        except protocol.ProtocolError as exc:
            self.metrics.invalid_messages.inc()
            await client.reply(protocol.error(str(exc)))
            return
        if isinstance(message, protocol.Subscribe):
            if message.uid not in client.subscriptions and \
                    len(client.subscriptions) >= protocol.MAX_SUBSCRIPTIONS_PER_CLIENT:
                self.metrics.invalid_messages.inc()
                await client.reply(protocol.error(
                    f"at most {protocol.MAX_SUBSCRIPTIONS_PER_CLIENT} subscriptions per connection"))
                return
            self._subscribe(client, message)
        elif isinstance(message, protocol.Unsubscribe):
            self._unsubscribe(client, message.uid)
        elif isinstance(message, protocol.Ping):
            await client.reply(protocol.PONG)
        elif isinstance(message, protocol.Auth):
            await self._reauthenticate(client, message.access_token)

    async def _reauthenticate(self, client: Client, token: str) -> None:
        """A new token (Directus clients refresh theirs): it must verify, and it moves the expiry."""
        if self.verifier is None:
            await client.reply(protocol.AUTH_OK)
            return
        claims = await self._verify(client.conn, token, client)
        if claims is not None:
            self._expire_at(client, claims)

    def _subscribe(self, client: Client, message: protocol.Subscribe) -> None:
        # The init is built when it is sent: it holds the latest positions of that moment.
        self._unsubscribe(client, message.uid)
        flt = Filter.build(message.devices, message.bbox, client.scope)
        client.subscriptions[message.uid] = self.registry.join(client, message.uid, flt)
        client.send_init(message.uid)
        self._count_subscriptions(+1)

    def _initial(self, flt: Filter) -> list[Fix]:
        if flt.devices is not None and len(flt.devices) < len(self.latest):
            found = (self.latest.get(d) for d in flt.devices)
            return [f for f in found if f is not None and flt.accepts(f)]
        return self.latest.select(flt.accepts)

    def _unsubscribe(self, client: Client, uid: str) -> None:
        group = client.subscriptions.pop(uid, None)
        client.drop(uid)
        if group is not None:
            self.registry.leave(client, group)
            self._count_subscriptions(-1)

    def _count_subscriptions(self, delta: int) -> None:
        self.metrics.subscriptions.inc(delta)
        self.metrics.subscription_groups.set(len(self.registry.groups))

    def _forget(self, client: Client) -> None:
        client.closing = True
        if client.expiry is not None:
            client.expiry.cancel()
        for uid in list(client.subscriptions):
            self._unsubscribe(client, uid)
        client.abandon()
        self.clients.discard(client)

    # --- stop ---

    async def _shutdown(self, server: Any, flush: asyncio.Task[None] | None) -> int:
        deadline = stop_deadline(self.stop_event, self.config.core.shutdown_timeout_s)  # from the signal
        self.stop_event.set()
        self.accepting = False
        # 1. No new connections; every open one is closed with 1001 (going away) and its handler ends.
        server.close(close_connections=True)
        try:
            await asyncio.wait_for(server.wait_closed(), timeout=max(0.1, deadline - time.monotonic()))
        except TimeoutError:
            log.warning("connections did not close within the shutdown timeout")
        # 2. The flush loop: nothing is left to send to.
        if flush is not None:
            flush.cancel()
        # 3. The stream reader sees the stop event within BLOCK_MS.
        clean = True
        if self.reader is not None:
            clean = await asyncio.to_thread(self.reader.join, max(0.1, deadline - time.monotonic()))
            if not clean:
                log.warning("the stream reader did not stop within the shutdown timeout")
        # 4. Redis last: the reader used it until now.
        if self.redis is not None:
            self.redis.close()
        log.info("gateway stopped")
        return EXIT_OK if clean and time.monotonic() <= deadline else EXIT_UNCLEAN


def _response(status: int, body: bytes, content_type: str = "text/plain; charset=utf-8",
              extra: list[tuple[str, str]] | None = None) -> Response:
    headers = Headers([("Content-Type", content_type), ("Content-Length", str(len(body))),
                       ("Connection", "close"), *(extra or [])])
    return Response(status, HTTPStatus(status).phrase, headers, body)


def _remote(conn: Any) -> str:
    try:
        host, port = conn.remote_address[:2]
        return f"{host}:{port}"
    except Exception:  # noqa: BLE001 - only for a log line
        return "?"
