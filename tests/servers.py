"""Fixtures that give a test its own PostgreSQL or Redis server, to stop, kill and restart at will.

Import them in conftest.py (or a test module) to use them:

    from tests.servers import throwaway_postgres, throwaway_redis  # noqa: F401

The shared servers of conftest.py are for everything else: these cost a second
(PostgreSQL's initdb) or a fifth of one (Redis) each. A test that needs the
binaries fails in CI (CI=true) when they are missing and is skipped locally.

A throwaway PostgreSQL is of the test's backend (``pg_backend``, see conftest.py):
on ``timescaledb`` it preloads the library and ``positions`` is a hypertable.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import psycopg2
import pytest

from processor.devservers import (
    TIMESCALEDB_SETTINGS,
    ThrowawayPostgres,
    ThrowawayRedis,
    postgres_bindir,
    redis_server_binary,
    timescaledb_installed,
)

# The PostgreSQL backends every test that touches `positions` runs on (conftest.py parametrises them).
BACKENDS = ("plain", "timescaledb")


def _missing(what: str, need: str = "the throwaway-server tests need it") -> None:
    message = f"{what} is not installed: {need}"
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(message)
    pytest.skip(message)


def require_timescaledb() -> None:
    """Skip (fail in CI) unless a throwaway PostgreSQL can preload TimescaleDB."""
    if postgres_bindir() is None:
        _missing("PostgreSQL (initdb, postgres)")
    if not timescaledb_installed():
        _missing("TimescaleDB (../shared/timescaledb/install.sh)", "the timescaledb backend needs it")


def positions_kind(url: str) -> str | None:
    """``hypertable``, ``table`` or None (no positions table) in the database at ``url``."""
    conn = psycopg2.connect(url)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT relkind FROM pg_class WHERE oid = to_regclass('public.positions')")
            row = cur.fetchone()
            if row is None:
                return None
            cur.execute("SELECT EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'timescaledb')")
            if cur.fetchone()[0]:
                cur.execute("SELECT count(*) FROM timescaledb_information.hypertables "
                            "WHERE hypertable_schema = 'public' AND hypertable_name = 'positions'")
                if cur.fetchone()[0]:
                    return "hypertable"
            return "table" if row[0] == "r" else f"relkind {row[0]}"
    finally:
        conn.close()


def assert_backend(url: str, backend: str) -> None:
    """The schema really gave the backend's kind of table: a suite that meant to test a
    hypertable must not test a plain table twice without saying so."""
    expected = {"plain": "table", "timescaledb": "hypertable"}[backend]
    kind = positions_kind(url)
    assert kind == expected, f"backend {backend}: positions is {kind}, expected a {expected}"


def apply_schema(url: str) -> None:
    """Apply the processor's schema.sql to the database at ``url``."""
    from processor.core.db import schema_sql

    conn = psycopg2.connect(url)
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.execute(schema_sql())
    finally:
        conn.close()


def _factory(new_server: Callable[..., Any],
             after_start: Callable[..., None] | None = None) -> Iterator[Callable[..., Any]]:
    """``make(**options)``: a started ``new_server(**options)`` (then ``after_start(server)``); all cleaned up after."""
    made: list[Any] = []

    def make(*, schema: bool = True, **options: Any) -> Any:
        server = new_server(**options)
        made.append(server)  # before start(): a server that fails to start is cleaned up too
        server.start()
        if after_start is not None and schema:
            after_start(server)
        return server

    try:
        yield make
    finally:
        for server in made:
            server.cleanup()


def backend_postgres(backend: str, *, settings: Mapping[str, str] | None = None,
                     **options: Any) -> ThrowawayPostgres:
    """A (not yet started) throwaway PostgreSQL of ``backend``: ``timescaledb`` preloads the library."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if backend == "timescaledb":
        require_timescaledb()
        settings = {**TIMESCALEDB_SETTINGS, **(settings or {})}
    return ThrowawayPostgres(settings=settings, **options)


def _schema_of_its_backend(server: ThrowawayPostgres) -> None:
    apply_schema(server.url)
    assert_backend(server.url, "timescaledb" if server.preloads_timescaledb else "plain")


@pytest.fixture
def throwaway_postgres_factory(pg_backend: str) -> Iterator[Callable[..., ThrowawayPostgres]]:
    """``make(password=None, ssl=False, schema=True, settings=None, backend=None)``: a started server
    of this test's backend (``backend`` names another), with the processor schema unless
    ``schema=False``; all removed at teardown."""
    if postgres_bindir() is None:
        _missing("PostgreSQL (initdb, postgres)")

    def build(*, backend: str | None = None, **options: Any) -> ThrowawayPostgres:
        return backend_postgres(backend or pg_backend, **options)

    yield from _factory(build, _schema_of_its_backend)


@pytest.fixture
def throwaway_postgres(throwaway_postgres_factory: Callable[..., ThrowawayPostgres]) -> ThrowawayPostgres:
    """A started PostgreSQL of this test's own and of its backend, with the processor schema applied."""
    return throwaway_postgres_factory()


@pytest.fixture
def throwaway_redis_factory() -> Iterator[Callable[..., ThrowawayRedis]]:
    """``make(password=None, tls=False, appendonly=False)``: a started server; all removed at teardown."""
    if redis_server_binary() is None:
        _missing("redis-server")
    yield from _factory(ThrowawayRedis)


@pytest.fixture
def throwaway_redis(throwaway_redis_factory: Callable[..., ThrowawayRedis]) -> ThrowawayRedis:
    """A started Redis of this test's own, without persistence."""
    return throwaway_redis_factory()
