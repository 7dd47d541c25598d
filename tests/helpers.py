"""Helpers shared by the tests: run the service as a real process, publish, wait, count."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Callable, Iterable

import psycopg2
import redis

ROOT = Path(__file__).resolve().parent.parent
BASE_MS = 1_700_000_000_000  # 2023-11-14T22:13:20Z: inside the accepted window


def wait_until(predicate: Callable[[], Any], timeout: float = 30.0, interval: float = 0.05,
               message: str = "condition") -> Any:
    """Poll ``predicate`` until it returns something truthy; fail the test after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {message}")
        time.sleep(interval)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def payload(device_id: str = "356307042441013", ts_ms: int = BASE_MS, **fields: Any) -> bytes:
    body: dict[str, Any] = {"device_id": device_id, "timestamp": ts_ms, "latitude": 54.6872,
                            "longitude": 25.2797, "speed": 42.5, "satellites": 9}
    body.update(fields)
    return json.dumps(body).encode()


def publish(client: redis.Redis, stream: str, payloads: Iterable[bytes], chunk: int = 1000) -> list[str]:
    """XADD each payload as field ``payload``; returns the entry ids."""
    ids: list[str] = []
    pipe = client.pipeline(transaction=False)
    n = 0
    for p in payloads:
        pipe.xadd(stream, {"payload": p})
        n += 1
        if n % chunk == 0:
            ids.extend(i.decode() for i in pipe.execute())
    ids.extend(i.decode() for i in pipe.execute())
    return ids


def scalar(pg_url: str, sql: str) -> Any:
    """The one value ``sql`` returns, on a connection of its own."""
    conn = psycopg2.connect(pg_url, connect_timeout=5)
    try:
        with conn.cursor() as cur:
            cur.execute(sql)
            return cur.fetchone()[0]
    finally:
        conn.close()


def row_count(pg_url: str, where: str = "TRUE") -> int:
    return int(scalar(pg_url, f"SELECT count(*) FROM positions WHERE {where}"))


def admin(pg_url: str, *statements: str) -> None:
    """Run ``statements`` in autocommit on a connection of its own (DDL, GRANT, ALTER SYSTEM...)."""
    conn = psycopg2.connect(pg_url, connect_timeout=5)
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            for sql in statements:
                cur.execute(sql)
    finally:
        conn.close()


def hold_write_lock(pg_url: str):
    """A connection holding an EXCLUSIVE lock on positions (writes wait, reads do not) until rolled back."""
    conn = psycopg2.connect(pg_url)
    conn.cursor().execute("LOCK TABLE positions IN EXCLUSIVE MODE")
    return conn


def pending_count(client: redis.Redis, stream: str, group: str) -> int:
    try:
        return int(client.xpending(stream, group)["pending"])
    except redis.ResponseError:
        return 0


def dead_letters(client: redis.Redis, stream: str) -> list[dict[str, bytes]]:
    return [{k.decode(): v for k, v in f.items()} for _, f in client.xrange(stream)]


def http_get(url: str, timeout: float = 5.0) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def metric_value(text: str, name: str, labels: dict[str, str] | None = None) -> float | None:
    """The value of one sample in a Prometheus exposition."""
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and (labels or {}) == {k: v for k, v in sample.labels.items()
                                                          if k in (labels or {})}:
                if labels is None and sample.labels:
                    continue
                return float(sample.value)
    return None


class ServiceProcess:
    """``python processor.py ARGS`` as a child process, its JSON log lines captured to a file."""

    def __init__(self, env: dict[str, str], *args: str) -> None:
        self.env = dict(env)
        self.args = args or ("run",)
        self._log = tempfile.NamedTemporaryFile(prefix="processor-", suffix=".log", delete=False)
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> "ServiceProcess":
        self.proc = subprocess.Popen([sys.executable, str(ROOT / "processor.py"), *self.args], cwd=str(ROOT),
                                     env=self.env, stdout=self._log, stderr=subprocess.STDOUT)
        return self

    def __enter__(self) -> "ServiceProcess":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.kill()
        self._log.close()
        os.unlink(self._log.name)

    @property
    def output(self) -> str:
        return Path(self._log.name).read_text(errors="replace")

    def logs(self) -> list[dict[str, Any]]:
        out = []
        for line in self.output.splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                out.append({"msg": line, "level": "raw"})
        return out

    def messages(self) -> list[str]:
        return [entry.get("msg", "") for entry in self.logs()]

    def wait_for_log(self, text: str, timeout: float = 30.0) -> None:
        def seen() -> bool:
            if self.proc is not None and self.proc.poll() is not None and text not in self.output:
                raise AssertionError(f"process exited {self.proc.returncode} before {text!r}:\n{self.output}")
            return any(text in m for m in self.messages())
        wait_until(seen, timeout, 0.05, f"log line {text!r}")

    def signal(self, sig: int = signal.SIGTERM) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def wait(self, timeout: float = 30.0) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def config_for(redis_url: str, pg_url: str, keys: dict[str, str], **overrides: Any) -> Any:
    """A validated Config for this test's servers and keys (no .env, no os.environ)."""
    from processor.core.config import load_config

    env = {
        "REDIS_URL": redis_url, "POSTGRES_URL": pg_url, "STREAM_KEY": keys["stream"],
        "CONSUMER_GROUP": keys["group"], "CONSUMER_NAME": keys["consumer"], "DEAD_LETTER_STREAM": keys["dead"],
        "METRICS_PORT": "0", "BLOCK_MS": "200",
    }
    env.update({k.upper(): str(v) for k, v in overrides.items()})
    return load_config(env, dotenv_path=None)


class InProcessService:
    """The service in a thread of the test process: for tests that inspect its state and metrics."""

    def __init__(self, config: Any, **kwargs: Any) -> None:
        import threading

        from prometheus_client import CollectorRegistry

        from processor.service import Service

        self.stop = threading.Event()
        self.registry = CollectorRegistry()
        self.service = Service(config, stop=self.stop, registry=self.registry, **kwargs)
        self.exit_code: int | None = None
        self._thread = threading.Thread(target=self._run, name="service-under-test", daemon=True)

    def _run(self) -> None:
        self.exit_code = self.service.run()

    def __enter__(self) -> "InProcessService":
        self._thread.start()
        wait_until(lambda: self.service.pipeline is not None or self.exit_code is not None, 30,
                   message="service start")
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self, timeout: float = 30.0) -> int | None:
        self.stop.set()
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "service did not stop"
        return self.exit_code

    def sample(self, name: str, labels: dict[str, str] | None = None) -> float | None:
        return self.registry.get_sample_value(name, labels or {})
