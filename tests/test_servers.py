"""The throwaway servers: data survives stop/start (and kill where promised), auth and TLS work."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import psycopg2
import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from processor.devservers import (
    ThrowawayPostgres,
    ThrowawayRedis,
    free_port,
    postgres_answers,
    redis_answers,
    timescaledb_installed,
)
from tests.helpers import ROOT, wait_until

# redis-py retries failed connections with backoff by default: a refusal should be quick.
NO_RETRY = Retry(NoBackoff(), 0)
ROW = ("356307042441013", "2024-05-01T12:00:00Z", 54.6872, 25.2797)


def _insert(url: str) -> None:
    conn = psycopg2.connect(url)
    with conn, conn.cursor() as cur:
        cur.execute("INSERT INTO positions (device_id, ts, latitude, longitude) VALUES (%s, %s, %s, %s)", ROW)
    conn.close()


def _rows(url: str) -> list[tuple[str, float]]:
    conn = psycopg2.connect(url)
    with conn, conn.cursor() as cur:
        cur.execute("SELECT device_id, latitude FROM positions ORDER BY device_id")
        rows = cur.fetchall()
    conn.close()
    return rows


def _alive(pid: int) -> bool:
    """True if ``pid`` is a live process (a zombie is not: it holds no socket)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            stat = fh.read().decode("ascii", "replace")
    except OSError:
        return False
    return stat[stat.rfind(")") + 2:].split()[0] != "Z"


# --- PostgreSQL ---

def test_postgres_keeps_data_and_port_across_stop_and_start(throwaway_postgres: ThrowawayPostgres) -> None:
    pg = throwaway_postgres
    url, port = pg.url, pg.port
    _insert(url)
    pg.stop()
    pg.stop()  # a second stop is harmless
    assert not pg.is_running()
    assert not postgres_answers(url)
    with pytest.raises(psycopg2.OperationalError):
        psycopg2.connect(url, connect_timeout=2)
    pg.start()
    assert pg.is_running()
    assert (pg.port, pg.url) == (port, url)
    assert _rows(url) == [(ROW[0], ROW[2])]


@pytest.mark.parametrize("mode", ["immediate", "smart"])
def test_postgres_stop_modes_keep_committed_rows(throwaway_postgres: ThrowawayPostgres, mode: str) -> None:
    _insert(throwaway_postgres.url)
    throwaway_postgres.stop(mode)
    assert not throwaway_postgres.is_running()
    throwaway_postgres.start()
    assert _rows(throwaway_postgres.url) == [(ROW[0], ROW[2])]


def test_postgres_kill_drops_connections_and_keeps_committed_rows(
        throwaway_postgres: ThrowawayPostgres) -> None:
    pg = throwaway_postgres
    _insert(pg.url)
    held = psycopg2.connect(pg.url)
    backend = held.get_backend_pid()
    pg.kill()
    assert not pg.is_running()
    # The backends go with the server (each is its own process group, so killing the
    # group alone left them to notice in their own time, and a query could still be answered).
    assert not _alive(backend)
    with pytest.raises((psycopg2.OperationalError, psycopg2.InterfaceError)), held.cursor() as cur:
        cur.execute("SELECT 1")
    held.close()
    pg.restart()
    assert _rows(pg.url) == [(ROW[0], ROW[2])]


def test_postgres_password_is_required(throwaway_postgres_factory) -> None:
    pg = throwaway_postgres_factory(password="s3cret p@ss", schema=False)
    assert pg.url == f"postgresql://postgres:s3cret%20p%40ss@127.0.0.1:{pg.port}/postgres"
    psycopg2.connect(pg.url).close()
    without = f"postgresql://postgres@127.0.0.1:{pg.port}/postgres"
    with pytest.raises(psycopg2.OperationalError, match="password"):
        psycopg2.connect(without, connect_timeout=5)
    wrong = f"postgresql://postgres:nope@127.0.0.1:{pg.port}/postgres"
    with pytest.raises(psycopg2.OperationalError, match="password authentication failed"):
        psycopg2.connect(wrong, connect_timeout=5)


def test_postgres_ssl_connection_is_encrypted_and_verifiable(throwaway_postgres_factory) -> None:
    pg = throwaway_postgres_factory(ssl=True, schema=False)
    assert pg.url.endswith("/postgres?sslmode=require")
    assert pg.ca_file is not None and pg.ca_file.is_file()
    verified = pg.url.replace("sslmode=require", f"sslmode=verify-full&sslrootcert={pg.ca_file}")
    for url in (pg.url, verified):
        conn = psycopg2.connect(url)
        with conn.cursor() as cur:
            cur.execute("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
            assert cur.fetchone() == (True,)
        conn.close()


def test_postgres_start_failure_raises_with_the_log_tail() -> None:
    pg = ThrowawayPostgres(settings={"shared_buffers": "'lots'"})
    try:
        with pytest.raises(RuntimeError, match="shared_buffers"):
            pg.start()
        assert not pg.is_running()
    finally:
        pg.cleanup()


def test_context_manager_removes_process_and_directory() -> None:
    with ThrowawayPostgres() as pg:
        assert pg.is_running()
        directory, url = pg.dir, pg.url
        assert directory.is_dir()
    assert not pg.is_running()
    assert not directory.exists()
    assert not postgres_answers(url)
    pg.cleanup()  # twice is harmless
    with pytest.raises(RuntimeError, match="cleaned up"):
        pg.start()


# --- Redis ---

def _stream_and_group(client: redis.Redis, stream: str = "telemetry:t") -> None:
    client.xadd(stream, {"payload": b"{}"})
    client.xadd(stream, {"payload": b"[]"})
    client.xgroup_create(stream, "processor", id="0")
    client.xreadgroup("processor", "c1", {stream: ">"}, count=1)


def test_redis_without_appendonly_loses_stream_on_restart(throwaway_redis: ThrowawayRedis) -> None:
    port = throwaway_redis.port
    with throwaway_redis.client() as client:
        _stream_and_group(client)
    throwaway_redis.stop()
    throwaway_redis.stop()
    assert not throwaway_redis.is_running()
    assert not redis_answers(throwaway_redis.url)
    throwaway_redis.start()
    assert throwaway_redis.port == port
    with throwaway_redis.client() as client:
        assert client.exists("telemetry:t") == 0


@pytest.mark.parametrize("crash", [False, True], ids=["restart", "kill"])
def test_redis_appendonly_keeps_stream_group_and_pending(throwaway_redis_factory, crash: bool) -> None:
    server = throwaway_redis_factory(appendonly=True)
    with server.client() as client:
        _stream_and_group(client)
    if crash:
        server.kill()
        assert not server.is_running()
        server.start()
    else:
        server.restart()
    with server.client() as client:
        assert client.xlen("telemetry:t") == 2
        groups = client.xinfo_groups("telemetry:t")
        assert [(g["name"], g["pending"]) for g in groups] == [(b"processor", 1)]


def test_redis_password_is_required(throwaway_redis_factory) -> None:
    server = throwaway_redis_factory(password="s3cret p@ss")
    assert server.url == f"redis://:s3cret%20p%40ss@127.0.0.1:{server.port}/0"
    with server.client() as client:
        assert client.ping() is True
    with redis.Redis(port=server.port, retry=NO_RETRY) as client, pytest.raises(redis.AuthenticationError):
        client.ping()
    with redis.Redis(port=server.port, password="nope", retry=NO_RETRY) as client, \
            pytest.raises(redis.AuthenticationError):
        client.ping()


def test_redis_tls_needs_tls_and_the_ca(throwaway_redis_factory) -> None:
    server = throwaway_redis_factory(tls=True)
    assert server.url == (f"rediss://127.0.0.1:{server.port}/0"
                          f"?ssl_cert_reqs=required&ssl_ca_certs={server.ca_file}")
    with server.client() as client:
        assert client.ping() is True
    plain = f"redis://127.0.0.1:{server.port}/0"
    with redis.Redis.from_url(plain, socket_timeout=2, retry=NO_RETRY) as client, \
            pytest.raises(redis.ConnectionError):
        client.ping()
    untrusted = f"rediss://127.0.0.1:{server.port}/0?ssl_cert_reqs=required"
    with redis.Redis.from_url(untrusted, socket_timeout=2, retry=NO_RETRY) as client, \
            pytest.raises(redis.ConnectionError, match="certificate verify failed"):
        client.ping()


def test_free_port_is_not_handed_out_twice_while_a_server_owns_it(throwaway_redis: ThrowawayRedis) -> None:
    throwaway_redis.stop()
    ports = {free_port() for _ in range(200)}
    assert throwaway_redis.port not in ports


# --- the `make run` wrapper ---

def _devservers(args: list[str], env: dict[str, str], cwd: Path, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "processor.devservers", *args], env=env, cwd=cwd,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("REDIS_", "POSTGRES_"))}
    env.update(extra)
    return env


# The child of the wrapper: prints what it was given and whether both servers answer.
PROBE_CHILD = textwrap.dedent("""
    import os, psycopg2, redis, sys
    redis_url, pg_url = os.environ["REDIS_URL"], os.environ["POSTGRES_URL"]
    try:
        redis_ok = redis.Redis.from_url(redis_url, socket_connect_timeout=2).ping()
    except redis.ConnectionError:
        redis_ok = False
    psycopg2.connect(pg_url, connect_timeout=5).close()
    print("child", redis_url, redis_ok, pg_url)
    sys.exit(3)
""")


def _devserver_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("devservers:")]


def _in_own_network(argv: list[str]) -> list[str]:
    """``argv`` in a network namespace of its own: nothing answers on the default URLs there."""
    probe = subprocess.run(["unshare", "--net", "sh", "-c", "ip link set lo up"], capture_output=True, text=True)
    if probe.returncode != 0:
        message = f"cannot make a network namespace (unshare --net, as root): {probe.stderr.strip()}"
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(message)
        pytest.skip(message)
    return ["unshare", "--net", "sh", "-c", 'ip link set lo up && exec "$@"', "sh", *argv]


def test_cli_starts_throwaways_where_no_url_was_set_and_nothing_answers(tmp_path: Path) -> None:
    # The first hour: nothing set, no server running. Both servers are started, the command gets them.
    argv = _in_own_network([sys.executable, "-m", "processor.devservers", "--", sys.executable, "-c", PROBE_CHILD])
    proc = subprocess.run(argv, env=_clean_env(), cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 3, proc.stderr
    lines = _devserver_lines(proc.stderr)
    assert len(lines) == 2, proc.stderr
    assert lines[0].startswith("devservers: nothing answers on redis://localhost:6379/0; "
                               "started a throwaway Redis on redis://127.0.0.1:")
    what = "PostgreSQL with TimescaleDB" if timescaledb_installed() else "PostgreSQL"
    assert lines[1].startswith("devservers: nothing answers on postgresql://postgres@localhost:5432/postgres; "
                               f"started a throwaway {what} on postgresql://postgres@127.0.0.1:")
    redis_url, pg_url = lines[0].rsplit(" ", 1)[1], lines[1].rsplit(" ", 1)[1]
    assert proc.stdout.strip() == f"child {redis_url} True {pg_url}"


@pytest.mark.parametrize("where", ["the environment", ".env"])
def test_cli_starts_no_throwaway_for_a_url_the_user_set(tmp_path: Path, where: str) -> None:
    # A mistyped port of one's own: the command gets that URL and fails on it, as `run` would.
    dead = f"redis://127.0.0.1:{free_port()}/0"
    env = _clean_env()
    if where == ".env":
        (tmp_path / ".env").write_text(f"REDIS_URL={dead}\n")
    else:
        env["REDIS_URL"] = dead
    proc = _devservers(["--", sys.executable, "-c", PROBE_CHILD], env, tmp_path)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 3, err
    assert _devserver_lines(err) == [f"devservers: nothing answers on {dead}, the URL set in {where}; starting no "
                                     "throwaway Redis in its place (unset it, or use make demo, to get one)"]
    assert out.strip() == f"child {dead} False postgresql://postgres@localhost:5432/postgres"


@pytest.mark.backends("plain")
def test_make_run_with_a_mistyped_redis_url_retries_it_like_run(tmp_path: Path, service_env: dict[str, str]) -> None:
    dead = f"redis://127.0.0.1:{free_port()}/0"
    env = dict(service_env, REDIS_URL=dead, LOG_FORMAT="text")
    log = tmp_path / "stderr.log"
    with open(log, "w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "processor.devservers", "--", sys.executable,
                                 str(ROOT / "processor.py"), "run"], env=env, cwd=tmp_path,
                                stdout=subprocess.DEVNULL, stderr=err)
    try:
        wait_until(lambda: "connect to Redis failed (attempt 2)" in log.read_text(), 30, 0.1, "two failed attempts")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0, log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = log.read_text()
    assert f"nothing answers on {dead}, the URL set in the environment" in text
    assert "started a throwaway" not in text and "processor ready" not in text


@pytest.mark.backends("plain")
def test_cli_demo_starts_a_throwaway_even_for_a_url_the_user_set(tmp_path: Path, pg_admin_url: str) -> None:
    dead = f"redis://127.0.0.1:{free_port()}/0"
    proc = _devservers(["--demo", "--", sys.executable, "-c", PROBE_CHILD],
                       _clean_env(REDIS_URL=dead, POSTGRES_URL=pg_admin_url), tmp_path)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 3, err
    started = [line for line in _devserver_lines(err) if "started a throwaway" in line]  # not the live map's URL
    assert len(started) == 1, err
    prefix = f"devservers: nothing answers on {dead}; started a throwaway Redis on redis://"
    assert started[0].startswith(prefix)
    url = started[0].rsplit(" ", 1)[1]
    assert out.strip() == f"child {url} True {pg_admin_url}"
    assert not redis_answers(url)  # removed when the command exited


def test_cli_fails_in_one_line_when_nothing_answers_and_nothing_is_installed(tmp_path: Path) -> None:
    # No URL set, nothing answers, and no redis-server on PATH.
    argv = _in_own_network(["env", f"PATH={tmp_path}", sys.executable, "-m", "processor.devservers", "--",
                            sys.executable, "-c", "print('ran')"])
    proc = subprocess.run(argv, env=_clean_env(), cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert proc.stdout == ""
    expected = ("devservers: nothing answers on redis://localhost:6379/0 and no Redis server is installed; "
                "start Redis or set the URL in the environment or .env")
    assert proc.stderr.splitlines() == [expected]


@pytest.mark.backends("plain")
def test_cli_forwards_sigterm_once_and_returns_the_exit_status(tmp_path: Path, redis_url: str,
                                                               pg_admin_url: str) -> None:
    child = textwrap.dedent("""
        import signal, sys, time
        got = []
        signal.signal(signal.SIGTERM, lambda s, f: got.append(s))
        print("ready", flush=True)
        deadline = time.monotonic() + 20
        while not got and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.3)  # a second forwarded signal would show up here
        print("signals", got, flush=True)
        sys.exit(7)
    """)
    proc = _devservers(["--", sys.executable, "-c", child],
                       _clean_env(REDIS_URL=redis_url, POSTGRES_URL=pg_admin_url), tmp_path)
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "ready"
    proc.send_signal(signal.SIGTERM)
    rest, err = proc.communicate(timeout=30)
    assert rest.strip() == f"signals [{int(signal.SIGTERM)}]"
    assert proc.returncode == 7
    assert "devservers:" not in err  # both servers answered: nothing started, nothing said
