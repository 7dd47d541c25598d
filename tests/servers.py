"""Fixtures that give a test its own PostgreSQL or Redis server, to stop, kill and restart at will.

Import them in conftest.py (or a test module) to use them:

    from tests.servers import throwaway_postgres, throwaway_redis  # noqa: F401

The shared servers of conftest.py are for everything else: these cost a second
(PostgreSQL's initdb) or a fifth of one (Redis) each. A test that needs the
binaries fails in CI (CI=true) when they are missing and is skipped locally.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import Any

import psycopg2
import pytest

from processor.devservers import (
    ThrowawayPostgres,
    ThrowawayRedis,
    postgres_bindir,
    redis_server_binary,
)


def _missing(what: str) -> None:
    message = f"{what} is not installed: the throwaway-server tests need it"
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(message)
    pytest.skip(message)


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


def _factory(cls: type, after_start: Callable[..., None] | None = None) -> Iterator[Callable[..., Any]]:
    """``make(**options)``: a started ``cls`` server (then ``after_start(server, **extra)``); all cleaned up after."""
    made: list[Any] = []

    def make(*, schema: bool = True, **options: Any) -> Any:
        server = cls(**options)
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


@pytest.fixture
def throwaway_postgres_factory() -> Iterator[Callable[..., ThrowawayPostgres]]:
    """``make(password=None, ssl=False, schema=True, settings=None)``: a started server,
    with the processor schema unless ``schema=False``; all removed at teardown."""
    if postgres_bindir() is None:
        _missing("PostgreSQL (initdb, postgres)")
    yield from _factory(ThrowawayPostgres, lambda server: apply_schema(server.url))


@pytest.fixture
def throwaway_postgres(throwaway_postgres_factory: Callable[..., ThrowawayPostgres]) -> ThrowawayPostgres:
    """A started PostgreSQL of this test's own, with the processor schema applied."""
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
