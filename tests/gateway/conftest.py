"""The gateway as a real process against this test's Redis stream and database, and real WebSocket clients."""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from tests.helpers import ROOT, free_port, wait_until

SECRET = "test-secret-of-directus-0123456789abcdef"
ISSUER = "directus"

websockets = pytest.importorskip("websockets", reason="the gateway extra (websockets) is not installed")
pytest.importorskip("jwt", reason="the gateway extra (PyJWT) is not installed")

from websockets.sync.client import ClientConnection, connect  # noqa: E402

from processor.gateway.auth import mint  # noqa: E402


def token(**claims: Any) -> str:
    return mint(SECRET, issuer=claims.pop("issuer", ISSUER), **claims)


@dataclass
class GatewayProcess:
    proc: subprocess.Popen[bytes]
    port: int
    env: dict[str, str]
    log_path: str
    stopped: bool = field(default=False)

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    def get(self, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(self.http + path, timeout=5) as resp:
                return resp.status, resp.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()

    def metric(self, name: str) -> float:
        """One sample's value from /metrics (``name`` with its labels as exported), 0 if absent."""
        _, text = self.get("/metrics")
        for line in text.splitlines():
            if line.startswith(name + " "):
                return float(line.rsplit(" ", 1)[1])
        return 0.0

    def rss_mb(self) -> float:
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        raise AssertionError("no VmRSS")

    def log(self) -> str:
        with open(self.log_path, errors="replace") as f:
            return f.read()

    def stop(self, timeout: float = 20.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=timeout)
        finally:
            self.stopped = True


@pytest.fixture
def gateway_env(redis_url: str, pg_url: str, keys: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("REDIS_", "POSTGRES_", "GATEWAY_"))}
    env.update({
        "REDIS_URL": redis_url, "POSTGRES_URL": pg_url, "STREAM_KEY": keys["stream"],
        "GATEWAY_HOST": "127.0.0.1", "GATEWAY_TOKEN_SECRET": SECRET, "GATEWAY_TOKEN_ISSUER": ISSUER,
        "LOG_LEVEL": "info", "LOG_FORMAT": "text", "PYTHONUNBUFFERED": "1", "BLOCK_MS": "200",
    })
    return env


@pytest.fixture
def start_gateway(gateway_env: dict[str, str], tmp_path) -> Iterator[Callable[..., GatewayProcess]]:
    """``start(**GATEWAY_VARIABLES)``: a gateway process that answers /readyz; all stopped after the test."""
    started: list[GatewayProcess] = []

    def start(**overrides: str) -> GatewayProcess:
        port = free_port()
        env = {**gateway_env, "GATEWAY_PORT": str(port), **{k: str(v) for k, v in overrides.items()}}
        log_path = str(tmp_path / f"gateway-{len(started)}.log")
        with open(log_path, "wb") as log:
            proc = subprocess.Popen([sys.executable, str(ROOT / "processor.py"), "gateway"], env=env, cwd=str(ROOT),
                                    stdout=log, stderr=subprocess.STDOUT)
        gw = GatewayProcess(proc, port, env, log_path)
        started.append(gw)

        def ready() -> bool:
            if proc.poll() is not None:
                raise AssertionError(f"gateway exited {proc.returncode}: {gw.log()}")
            try:
                return gw.get("/readyz")[0] == 200
            except OSError:
                return False

        wait_until(ready, timeout=30, message="the gateway's /readyz")
        return gw

    yield start
    for gw in started:
        if not gw.stopped:
            gw.stop()


def recv_json(ws: ClientConnection, timeout: float = 5.0) -> dict[str, Any]:
    return json.loads(ws.recv(timeout=timeout))


def open_client(gw: GatewayProcess, *, auth: str | None = None, query_token: str | None = None,
                **kwargs: Any) -> ClientConnection:
    """A connected client; authenticated (and the ok read) when ``auth`` is given."""
    url = gw.ws + (f"?access_token={query_token}" if query_token else "")
    # Entered as a context manager (websockets 17 warns otherwise); the tests close it or the gateway does.
    ws = connect(url, open_timeout=10, max_size=None, **kwargs).__enter__()
    if auth is not None:
        ws.send(json.dumps({"type": "auth", "access_token": auth}))
        assert recv_json(ws) == {"type": "auth", "status": "ok"}
    return ws


def subscribe(ws: ClientConnection, uid: str = "s1", **narrow: Any) -> dict[str, Any]:
    """Subscribe and return the init message."""
    ws.send(json.dumps({"type": "subscribe", "uid": uid, **narrow}))
    init = recv_json(ws)
    assert (init["type"], init["uid"], init["event"]) == ("subscription", uid, "init"), init
    return init


def updates_until(ws: ClientConnection, done: Callable[[dict[str, dict[str, Any]]], bool], timeout: float = 10.0
                  ) -> tuple[list[dict[str, Any]], dict[str, dict[str, Any]]]:
    """Read update messages until ``done(latest position per device)``; returns (messages, latest)."""
    messages: list[dict[str, Any]] = []
    latest: dict[str, dict[str, Any]] = {}
    deadline = time.monotonic() + timeout
    while not done(latest):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise AssertionError(f"timed out; got {len(messages)} updates, latest {sorted(latest)}")
        message = recv_json(ws, timeout=remaining)
        messages.append(message)
        for p in message.get("positions", []):
            latest[p["device_id"]] = p
    return messages, latest



def masked(payload: bytes) -> bytes:
    """A client's text frame (RFC 6455 5.3: masked) of fewer than 126 bytes."""
    assert len(payload) < 126
    mask = os.urandom(4)
    return bytes([0x81, 0x80 | len(payload)]) + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def raw_client(port: int, jwt: str, rcvbuf: int = 4096) -> socket.socket:
    """A WebSocket client by hand, no compression offered, a small receive buffer and the token on the URL:
    its socket after the handshake, nothing past the 101 read."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.connect(("127.0.0.1", port))
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall((f"GET /ws?access_token={jwt} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
                  f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode())
    head = b""
    while b"\r\n\r\n" not in head:
        head += sock.recv(1)  # byte by byte: nothing past the handshake is read
    assert head.startswith(b"HTTP/1.1 101"), head
    return sock
