"""Test harness: every test talks to real Redis and PostgreSQL, each with its own data.

Services are found from TEST_REDIS_URL / TEST_POSTGRES_URL, else the localhost
defaults. If they do not answer and a Docker engine does, pytest-docker brings
up docker-compose.yml. Otherwise the tests fail in CI (CI=true) and skip with
the reason locally.

Each test gets a fresh database (cloned from a template that already has the
schema) and unique stream keys; both are dropped afterwards.

Two PostgreSQL backends (docs/decisions.md, "Tests"): every test that uses a
PostgreSQL fixture (``pg_admin_url``, ``pg_url``, ``empty_pg_url``, ``pg_conn``,
``service_env``, the throwaway servers, and whatever builds on them) runs once
on ``plain`` (the server above, where positions is a plain table) and once on
``timescaledb`` (TEST_TIMESCALEDB_URL, else a throwaway server of the session
that preloads TimescaleDB; positions is a hypertable). ``@pytest.mark.backends("plain")``
keeps a test on the backends it names; ``TEST_BACKENDS=plain`` (a comma list)
runs the session on fewer.
"""

from __future__ import annotations

import os
import queue
import shutil
import subprocess
import threading
import uuid
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import psycopg2
import pytest
import redis

# Throwaway servers on free ports (initdb/postgres, redis-server), for tests that stop, kill or restart one.
from tests.servers import (BACKENDS, apply_schema, assert_backend, backend_postgres,  # noqa: E402,F401
                           throwaway_postgres, throwaway_postgres_factory, throwaway_redis,
                           throwaway_redis_factory)

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
DEFAULT_POSTGRES_URL = "postgresql://postgres@127.0.0.1:5432/postgres"


def _session_backends() -> tuple[str, ...]:
    raw = os.environ.get("TEST_BACKENDS", "")
    names = tuple(n.strip() for n in raw.split(",") if n.strip()) or BACKENDS
    unknown = set(names) - set(BACKENDS)
    if unknown:
        raise pytest.UsageError(f"TEST_BACKENDS must name some of {', '.join(BACKENDS)}, got {raw!r}")
    return names


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Each test whose fixtures reach PostgreSQL runs once per backend (its ``backends`` marker may narrow it)."""
    if "pg_backend" not in metafunc.fixturenames:
        return
    wanted = _session_backends()
    marker = metafunc.definition.get_closest_marker("backends")
    if marker is not None:
        unknown = set(marker.args) - set(BACKENDS)
        if not marker.args or unknown:
            raise pytest.UsageError(f"{metafunc.definition.nodeid}: @pytest.mark.backends takes some of "
                                    f"{', '.join(BACKENDS)}, got {marker.args!r}")
        wanted = tuple(b for b in wanted if b in marker.args)
    # Session scope: the backend's server and template are made once and shared by its tests.
    # An empty list makes pytest report the test as skipped ("got empty parameter set").
    metafunc.parametrize("pg_backend", wanted, indirect=True, scope="session")


def _in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def _unavailable(what: str, url: str, exc: BaseException) -> None:
    message = f"{what} is not reachable at {url} ({exc}); set TEST_{what.upper()}_URL or start it"
    if _in_ci():
        pytest.fail(message)
    pytest.skip(message)


def _redis_ok(url: str) -> BaseException | None:
    try:
        redis.Redis.from_url(url, socket_connect_timeout=2).ping()
    except Exception as exc:  # noqa: BLE001 - any failure means "not usable"
        return exc
    return None


def _postgres_ok(url: str) -> BaseException | None:
    try:
        psycopg2.connect(url, connect_timeout=3).close()
    except Exception as exc:  # noqa: BLE001
        return exc
    return None


def _docker_answers() -> bool:
    if not shutil.which("docker"):
        return False
    try:
        return subprocess.run(["docker", "info"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def with_database(url: str, dbname: str) -> str:
    """``url`` pointing at database ``dbname``."""
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path="/" + dbname))


@pytest.fixture(scope="session")
def docker_compose_file() -> str:
    return str(ROOT / "docker-compose.yml")


@pytest.fixture(scope="session")
def _services(request: pytest.FixtureRequest) -> dict[str, str]:
    redis_url = os.environ.get("TEST_REDIS_URL", DEFAULT_REDIS_URL)
    pg_url = os.environ.get("TEST_POSTGRES_URL", DEFAULT_POSTGRES_URL)
    redis_err, pg_err = _redis_ok(redis_url), _postgres_ok(pg_url)
    explicit = "TEST_REDIS_URL" in os.environ or "TEST_POSTGRES_URL" in os.environ
    if (redis_err or pg_err) and not explicit and _docker_answers():
        docker_services = request.getfixturevalue("docker_services")
        redis_url = f"redis://127.0.0.1:{docker_services.port_for('redis', 6379)}/0"
        pg_url = f"postgresql://postgres:postgres@127.0.0.1:{docker_services.port_for('timescaledb', 5432)}/postgres"
        docker_services.wait_until_responsive(lambda: _redis_ok(redis_url) is None, timeout=60, pause=1)
        docker_services.wait_until_responsive(lambda: _postgres_ok(pg_url) is None, timeout=60, pause=1)
        # compose's database is TimescaleDB: it serves the timescaledb backend.
        return {"redis": redis_url, "postgres": pg_url, "timescaledb": pg_url}
    if redis_err:
        _unavailable("Redis", redis_url, redis_err)
    if pg_err:
        _unavailable("Postgres", pg_url, pg_err)
    return {"redis": redis_url, "postgres": pg_url}


@pytest.fixture(scope="session")
def redis_url(_services: dict[str, str]) -> str:
    return _services["redis"]


@pytest.fixture(scope="session")
def pg_backend(request: pytest.FixtureRequest) -> str:
    """``plain`` or ``timescaledb``: the kind of PostgreSQL this test runs on (parametrised above)."""
    return getattr(request, "param", BACKENDS[0])


@pytest.fixture(scope="session")
def _timescaledb_admin_url(_services: dict[str, str]) -> str:
    """The maintenance database of a PostgreSQL that preloads TimescaleDB, for the whole session."""
    url = os.environ.get("TEST_TIMESCALEDB_URL") or _services.get("timescaledb")
    if url:
        err = _postgres_ok(url)
        if err:
            _unavailable("TimescaleDB", url, err)
        yield url
        return
    server = backend_postgres("timescaledb")
    with server:
        yield server.url


@pytest.fixture(scope="session")
def pg_admin_url(pg_backend: str, _services: dict[str, str], request: pytest.FixtureRequest) -> str:
    """The maintenance database of this test's backend: for CREATE/DROP DATABASE only."""
    if pg_backend == "timescaledb":
        return request.getfixturevalue("_timescaledb_admin_url")
    if "timescaledb" in _services:
        pytest.skip("the only PostgreSQL is docker-compose's TimescaleDB: no plain backend (set TEST_POSTGRES_URL)")
    return _services["postgres"]


def _admin_exec(admin_url: str, sql: str) -> None:
    conn = psycopg2.connect(admin_url)
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.execute(sql)
    finally:
        conn.close()


@pytest.fixture(scope="session")
def pg_template(pg_admin_url: str, pg_backend: str) -> str:
    """A template database that already has the schema; fresh databases are cloned from it."""
    name = f"tp_template_{uuid.uuid4().hex[:8]}"
    _admin_exec(pg_admin_url, f'CREATE DATABASE "{name}"')
    apply_schema(with_database(pg_admin_url, name))
    assert_backend(with_database(pg_admin_url, name), pg_backend)
    # CREATE DATABASE ... TEMPLATE refuses a template with sessions, and a TimescaleDB server with its
    # background workers on (TEST_TIMESCALEDB_URL, compose) keeps a job scheduler in every database with
    # the extension: close the template to connections (the launcher skips such databases), end what is there.
    _admin_exec(pg_admin_url, f'ALTER DATABASE "{name}" WITH ALLOW_CONNECTIONS false')
    _admin_exec(pg_admin_url, f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{name}'")
    yield name
    _admin_exec(pg_admin_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _fresh_database(admin_url: str, template: str | None) -> tuple[str, str]:
    name = f"tp_{uuid.uuid4().hex[:12]}"
    clause = f' TEMPLATE "{template}"' if template else ""
    _admin_exec(admin_url, f'CREATE DATABASE "{name}"{clause}')
    return name, with_database(admin_url, name)


class _DatabasePool:
    """Fresh databases cloned ahead of time and dropped behind, by threads of the harness's own.

    CREATE DATABASE and DROP DATABASE take about 0.1 s each on the machine's server (fsync on), and
    some 700 tests take a database: done in the test's own time, that was minutes of the suite.
    Every test still gets a database nobody used, cloned from the template. Clones come first;
    drops wait until enough clones are ready (the last ones are dropped at the session's end).
    """

    AHEAD = 3
    THREADS = 2

    def __init__(self, admin_url: str, template: str) -> None:
        self.admin_url, self.template = admin_url, template
        self._ready: queue.Queue[str | BaseException] = queue.Queue()
        self._lock = threading.Condition()
        self._wanted = self.AHEAD  # clones asked for and not yet made
        self._doomed: list[str] = []  # databases to drop
        self._closing = False
        self._threads = [threading.Thread(target=self._run, name=f"test-databases-{n}", daemon=True)
                         for n in range(self.THREADS)]
        for thread in self._threads:
            thread.start()

    def take(self) -> str:
        """A fresh database's name (the threads clone the next one meanwhile)."""
        with self._lock:
            self._wanted += 1
            self._lock.notify()
        item = self._ready.get(timeout=120)
        if isinstance(item, BaseException):
            raise item
        return item

    def give_back(self, name: str) -> None:
        with self._lock:
            self._doomed.append(name)
            self._lock.notify()

    def close(self) -> None:
        with self._lock:
            self._closing = True
            self._lock.notify_all()
        for thread in self._threads:
            thread.join(300)
        while not self._ready.empty():
            item = self._ready.get_nowait()
            if isinstance(item, str):
                self._drop(item)

    def _next(self) -> str | None:
        """"" to clone one, a name to drop, None to end."""
        with self._lock:
            while True:
                if self._wanted > 0 and not self._closing:
                    self._wanted -= 1
                    return ""
                if self._doomed:
                    return self._doomed.pop()
                if self._closing:
                    return None
                self._lock.wait()

    def _run(self) -> None:
        while (job := self._next()) is not None:
            try:
                if job:
                    self._drop(job)
                else:
                    self._ready.put(_fresh_database(self.admin_url, self.template)[0])
            except Exception as exc:  # noqa: BLE001 - handed to the test that waits for a database
                if not job:
                    self._ready.put(exc)

    def _drop(self, name: str) -> None:
        _admin_exec(self.admin_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def _databases(pg_admin_url: str, pg_template: str) -> _DatabasePool:
    pool = _DatabasePool(pg_admin_url, pg_template)
    yield pool
    pool.close()


@pytest.fixture
def pg_url(pg_admin_url: str, _databases: _DatabasePool) -> str:
    """A fresh database with the schema applied, dropped after the test."""
    name = _databases.take()
    yield with_database(pg_admin_url, name)
    _databases.give_back(name)


@pytest.fixture
def empty_pg_url(pg_admin_url: str) -> str:
    """A fresh database with no schema at all (for migration tests)."""
    name, url = _fresh_database(pg_admin_url, None)
    yield url
    _admin_exec(pg_admin_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def pg_conn(pg_url: str):
    conn = psycopg2.connect(pg_url)
    conn.autocommit = True
    yield conn
    conn.close()


@pytest.fixture
def keys(redis_url: str) -> dict[str, str]:
    """Unique stream, group and dead-letter keys for this test; deleted afterwards."""
    tag = uuid.uuid4().hex[:10]
    names = {
        "stream": f"test:{tag}:t",
        "group": f"g{tag}",
        "dead": f"test:{tag}:t:dead",
        "consumer": f"c{tag}",
    }
    yield names
    client = redis.Redis.from_url(redis_url)
    client.delete(names["stream"], names["dead"])
    client.close()


@pytest.fixture
def redis_client(redis_url: str):
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


@pytest.fixture
def service_env(redis_url: str, pg_url: str, keys: dict[str, str]) -> dict[str, str]:
    """Environment for running ``processor.py`` as a subprocess against this test's data."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("REDIS_", "POSTGRES_"))}
    env.update({
        "REDIS_URL": redis_url,
        "POSTGRES_URL": pg_url,
        "STREAM_KEY": keys["stream"],
        "CONSUMER_GROUP": keys["group"],
        "CONSUMER_NAME": keys["consumer"],
        "DEAD_LETTER_STREAM": keys["dead"],
        "METRICS_PORT": "0",
        "LOG_LEVEL": "info",
        "LOG_FORMAT": "json",
        "PYTHONUNBUFFERED": "1",
    })
    return env
