"""Security and safe defaults (issue 8), against real servers and the real process.

1. Secrets: passwords in REDIS_URL / POSTGRES_URL appear in no log line, /readyz, /metrics, dead letter,
   --help or config error, through an outage, a refused password and a driver error that echoes the DSN.
2. TLS: rediss:// and sslmode=verify-full work unchanged; the connections really are encrypted.
3. SQL: tab, newline, backslash, both quotes and ``\\N`` round-trip exactly on the COPY and VALUES paths;
   no SQL text is built from runtime values (static check of processor/).
4. Least privilege: the README's roles, run as written; the service works as the INSERT/SELECT role.
5. The metrics endpoint binds where it is told.
6. Edge inputs (10 MB, 10,000 fields, depth 1,000, invalid UTF-8): the right reason, quickly, memory bounded.
"""

from __future__ import annotations

import ast
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterable

import psycopg2
import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from processor.core.decode import MAX_ATTRIBUTE_DEPTH, MAX_FIELDS, Decoder
from processor.core.types import INVALID_JSON, Position, Rejection, TOO_LARGE
from processor.core.writer import COPY_THRESHOLD
from tests.helpers import (BASE_MS, ServiceProcess, dead_letters, free_port, http_get, metric_value, payload,
                           pending_count, publish, row_count, wait_until)
from tests.servers import assert_backend

ROOT = Path(__file__).resolve().parent.parent
PW = "Sup3r-Secr3t-pw"
WRONG_PW = "Wr0ng-Secr3t-pw"
# Both passwords share this; finding it anywhere also catches a password shown in part.
SECRET_CORE = "Secr3t"


# --- helpers ---------------------------------------------------------------------------------

def _env(redis_url: str, pg_url: str, keys: dict[str, str], **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("REDIS_", "POSTGRES_"))}
    env.update({
        "REDIS_URL": redis_url, "POSTGRES_URL": pg_url, "STREAM_KEY": keys["stream"],
        "CONSUMER_GROUP": keys["group"], "CONSUMER_NAME": keys["consumer"], "DEAD_LETTER_STREAM": keys["dead"],
        "METRICS_PORT": "0", "BLOCK_MS": "200", "LOG_LEVEL": "info", "LOG_FORMAT": "json",
        "PYTHONUNBUFFERED": "1",
    })
    env.update(extra)
    return env


def _execute(url: str, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    conn = psycopg2.connect(url)
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.execute(sql, params or None)
            return cur.fetchall() if cur.description else []
    finally:
        conn.close()


def _assert_no_secret(texts: Iterable[str], where: str) -> None:
    for text in texts:
        for secret in (SECRET_CORE, SECRET_CORE.lower()):
            assert secret not in text, f"password shown in {where}:\n{text}"


def _dead_letter_texts(client: redis.Redis, stream: str) -> list[str]:
    return [f"{k}={v.decode('utf-8', 'replace')}" for letter in dead_letters(client, stream)
            for k, v in letter.items()]


def _wait_for_status(url: str, status: int, timeout: float) -> str:
    def check() -> str | None:
        code, body = http_get(url)
        return body if code == status else None
    return wait_until(check, timeout, 0.2, f"{url} answering {status}")


def _stop(proc: ServiceProcess, timeout: float = 20) -> int:
    proc.signal(signal.SIGTERM)
    return proc.wait(timeout)


def _cli(env: dict[str, str], *args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(ROOT / "processor.py"), *args], cwd=str(ROOT), env=env,
                          capture_output=True, text=True, timeout=timeout)


def _vm_kb(pid: int, field: str = "VmRSS") -> int:
    """A memory figure of /proc/<pid>/status, in kB (VmRSS: now; VmHWM: the peak)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} line")


# A downstream trigger that refuses one device and echoes a connection string in its message:
# the worst case for a db_rejected dead letter's detail and the writer's warning.
REFUSING_TRIGGER = """
CREATE FUNCTION refuse_marked() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.device_id = 'refused' THEN
        RAISE EXCEPTION 'refused by audit; caller postgresql://postgres:%@127.0.0.1/postgres password=%',
            :pw, :pw;
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER refuse_marked BEFORE INSERT ON positions FOR EACH ROW EXECUTE FUNCTION refuse_marked();
"""


# --- 1. secrets ------------------------------------------------------------------------------

def test_passwords_appear_nowhere_through_dead_letters_and_an_outage(throwaway_postgres_factory,
                                                                      throwaway_redis_factory, keys):
    pg = throwaway_postgres_factory(password=PW)
    rd = throwaway_redis_factory(password=PW)
    _execute(pg.url, REFUSING_TRIGGER.replace(":pw", "'" + PW + "'"))
    port = free_port()
    env = _env(rd.url, pg.url, keys, LOG_LEVEL="debug", METRICS_PORT=str(port), MAX_DELIVERIES="1")
    readyz, metrics = f"http://127.0.0.1:{port}/readyz", f"http://127.0.0.1:{port}/metrics"
    client = rd.client()
    shown: list[str] = []
    with ServiceProcess(env) as proc:
        proc.wait_for_log("processor ready")
        publish(client, keys["stream"], [payload(f"d{i}", BASE_MS + i) for i in range(50)]
                + [b"{not json", payload("refused", BASE_MS)])
        wait_until(lambda: row_count(pg.url) == 50 and client.xlen(keys["dead"]) == 2, 30, 0.1, "rows and letters")
        shown.append(_wait_for_status(readyz, 200, 10))

        # PostgreSQL goes away while data flows: retries, warnings, /readyz 503 with the reason.
        pg.stop()
        publish(client, keys["stream"], [payload(f"d{i}", BASE_MS + i) for i in range(50, 100)])
        body = _wait_for_status(readyz, 503, 15)
        assert "postgres:" in body, body
        shown += [body, http_get(metrics)[1]]
        pg.start()
        wait_until(lambda: row_count(pg.url) == 100 and pending_count(client, keys["stream"], keys["group"]) == 0,
                   40, 0.2, "the rows written after the outage")
        shown.append(_wait_for_status(readyz, 200, 15))
        code, text = http_get(metrics)
        assert code == 200
        shown.append(text)
        assert _stop(proc) == 0
        output = proc.output
    reasons = sorted(letter["reason"].decode() for letter in dead_letters(client, keys["dead"]))
    shown_letters = _dead_letter_texts(client, keys["dead"])
    client.close()

    _assert_no_secret(output.splitlines(), "the service's log")
    _assert_no_secret(shown, "/readyz or /metrics")
    _assert_no_secret(shown_letters, "the dead-letter stream")
    # Those checks would pass vacuously if nothing had been captured: make sure it was.
    assert reasons == ["db_rejected", "invalid_json"]
    assert any("refused by audit; caller postgresql://postgres:***@127.0.0.1/postgres password=***" in t
               for t in shown_letters), shown_letters
    assert metric_value(text, "processor_records_dead_lettered_total", {"reason": "db_rejected"}) == 1
    assert "batch consumed n=" in output and "PostgreSQL write failed" in output
    assert output.count("\n") > 20


def _failing_start(env: dict[str, str], expected: str, port: int) -> None:
    """Run the service until it has retried once; no secret in its log or HTTP answers, ``expected`` in its log."""
    with ServiceProcess(env) as proc:
        proc.wait_for_log("(attempt 2", timeout=20)
        bodies = [http_get(f"http://127.0.0.1:{port}/readyz")[1], http_get(f"http://127.0.0.1:{port}/metrics")[1]]
        _stop(proc)
        output = proc.output
    _assert_no_secret(output.splitlines(), f"the log of a run with {expected!r}")
    _assert_no_secret(bodies, "/readyz or /metrics")
    assert expected in output, output


def test_passwords_appear_nowhere_when_refused_or_echoed_by_the_driver(throwaway_postgres_factory,
                                                                        throwaway_redis_factory, keys):
    pg = throwaway_postgres_factory(password=PW, schema=False)
    rd = throwaway_redis_factory(password=PW)
    runs = [
        # the server refuses the password: it names the user, never the password
        (rd.url, pg.url.replace(PW, WRONG_PW), 'password authentication failed for user \\"postgres\\"'),
        # libpq quotes the password itself back in its error (a bad %-escape in the URL)
        (rd.url, pg.url.replace(PW, PW + "%zz"), 'invalid percent-encoded token: \\"***\\"'),
        # Redis refuses the password (PostgreSQL is fine)
        (rd.url.replace(PW, WRONG_PW), pg.url, "invalid username-password pair"),
    ]
    for redis_url, pg_url, expected in runs:
        port = free_port()
        env = _env(redis_url, pg_url, keys, LOG_LEVEL="debug", METRICS_PORT=str(port))
        _failing_start(env, expected, port)


def test_passwords_appear_nowhere_in_help_or_configuration_errors(keys):
    pg_url = f"postgresql://postgres:{PW}@127.0.0.1:1/postgres"
    redis_url = f"rediss://:{PW}@127.0.0.1:1/0?ssl_cert_reqs=required"
    env = _env(redis_url, pg_url, keys)
    script = Path(sys.executable).parent / "telemetry-processor"  # the installed console script
    command = [str(script)] if script.is_file() else [sys.executable, str(ROOT / "processor.py")]
    help_run = subprocess.run([*command, "--help"], env=env, capture_output=True, text=True, timeout=30)
    assert help_run.returncode == 0 and "POSTGRES_URL" in help_run.stdout
    cases = [
        ({"BATCH_SIZE": "abc"}, 2, "telemetry-processor: BATCH_SIZE must be a positive integer, got 'abc'"),
        ({"POSTGRES_URL": f"postgresql://postgres:{PW}@[::1/postgres"}, 2,
         "telemetry-processor: POSTGRES_URL must be a postgresql:// URL, got 'postgresql://postgres:***@[::1/postgres'"),
        ({"REDIS_URL": f"http://:{PW}@127.0.0.1:6379/0"}, 2,
         "telemetry-processor: REDIS_URL must be a redis://, rediss:// or unix:// URL, got 'http://:***@127.0.0.1:6379/0'"),
    ]
    for extra, status, line in cases:
        run = _cli({**env, **extra})
        assert (run.returncode, run.stdout, run.stderr.strip()) == (status, "", line)
    migrate = _cli({**env, "POSTGRES_URL": pg_url.replace(PW, PW + "%zz")}, "migrate")
    assert migrate.returncode == 1
    assert 'invalid percent-encoded token: \\"***\\"' in migrate.stderr, migrate.stderr
    _assert_no_secret([help_run.stdout, help_run.stderr, migrate.stdout, migrate.stderr], "--help or migrate")


# --- 2. TLS ----------------------------------------------------------------------------------

def test_tls_to_redis_and_postgres_end_to_end(throwaway_postgres_factory, throwaway_redis_factory, keys):
    rd = throwaway_redis_factory(tls=True)
    pg = throwaway_postgres_factory(ssl=True)
    assert rd.url.startswith("rediss://") and "ssl_cert_reqs=required&ssl_ca_certs=" in rd.url
    pg_url = pg.url.replace("sslmode=require", f"sslmode=verify-full&sslrootcert={pg.ca_file}")
    client = rd.client()
    # The Redis server listens on its TLS port only: a plain connection there fails.
    assert client.config_get("port") == {"port": "0"}
    assert client.config_get("tls-port") == {"tls-port": str(rd.port)}
    plain = redis.Redis(host="127.0.0.1", port=rd.port, socket_timeout=2, retry=Retry(NoBackoff(), 0))
    with pytest.raises(redis.ConnectionError):
        plain.ping()
    plain.close()

    publish(client, keys["stream"], [payload(f"tls{i % 25}", BASE_MS + i) for i in range(1000)])
    with ServiceProcess(_env(rd.url, pg_url, keys)) as proc:
        wait_until(lambda: row_count(pg.url) == 1000, 40, 0.1, "1,000 rows over TLS")
        wait_until(lambda: pending_count(client, keys["stream"], keys["group"]) == 0, 10, 0.1, "nothing pending")
        sessions = _execute(pg.url, """
            SELECT s.ssl, s.version FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid)
            WHERE a.application_name = 'telemetry-processor'""")
        assert _stop(proc) == 0
    assert sessions and all(ssl for ssl, _ in sessions), sessions
    assert all(version and version.startswith("TLS") for _, version in sessions), sessions
    assert client.xlen(keys["dead"]) == 0
    client.close()


# --- 3. SQL ----------------------------------------------------------------------------------

# Each holds characters COPY's text format or SQL quoting treat specially; "\\N" alone is COPY's NULL.
AWKWARD_DEVICES = ["\\N", "tab\there", "new\nline", "back\\slash", "quote'single", 'quote"double',
                   "all\t\n\\'\"\\N;--"]
AWKWARD_ATTRIBUTES = {
    "text": "tab\tnew\nback\\single'double\"null\\N",
    "\\N": "\\N",
    "key\t\n\\'\"": ["\\N", {"deep\\": "x\ty", "'); DROP TABLE positions; --": "\\\\N"}],
    "239": "\\",
}


def _awkward(i: int, ts_ms: int) -> bytes:
    return payload(AWKWARD_DEVICES[i % len(AWKWARD_DEVICES)], ts_ms, attributes={**AWKWARD_ATTRIBUTES, "i": i})


def _batch_sizes(messages: list[str]) -> list[int]:
    return [int(m.rsplit("=", 1)[1]) for m in messages if m.startswith("batch consumed n=")]


def test_awkward_characters_round_trip_exactly_on_both_writer_paths(throwaway_postgres_factory, redis_url,
                                                                     redis_client, keys):
    # A server of our own that logs every statement and every error: it shows which path wrote the rows
    # (a COPY that failed would be split into small VALUES batches and still write them all).
    pg = throwaway_postgres_factory(settings={"log_statement": "all"})
    copy_entries = {(AWKWARD_DEVICES[i % 7], BASE_MS + i): i for i in range(140)}
    values_entries = {(AWKWARD_DEVICES[i], BASE_MS + 100_000 + i): 1000 + i for i in range(7)}
    # Published before the start, so that the first read takes all 140 at once: the COPY path.
    publish(redis_client, keys["stream"], [_awkward(i, ts) for (_, ts), i in copy_entries.items()])
    with ServiceProcess(_env(redis_url, pg.url, keys, LOG_LEVEL="debug")) as proc:
        wait_until(lambda: row_count(pg.url) == 140, 30, 0.1, "the COPY batch")
        # Published while idle: small batches, the VALUES path.
        publish(redis_client, keys["stream"], [_awkward(i - 1000, ts) for (_, ts), i in values_entries.items()])
        wait_until(lambda: row_count(pg.url) == 147, 30, 0.1, "the VALUES batches")
        wait_until(lambda: pending_count(redis_client, keys["stream"], keys["group"]) == 0, 10)
        assert _stop(proc) == 0
        messages = proc.messages()
    sizes = _batch_sizes(messages)
    assert sizes[0] == 140 >= COPY_THRESHOLD, sizes
    assert sum(sizes[1:]) == 7 and max(sizes[1:]) < COPY_THRESHOLD, sizes
    server_log = pg.log_file.read_text(errors="replace")
    # One COPY carried the big batch: straight into positions (the writer's first try for a batch of new
    # keys) or through the staging table and one INSERT ... SELECT; the small batches went as VALUES.
    from processor.core.writer import COLUMNS, COPY_SQL, DIRECT_COPY_SQL
    direct, staged = server_log.count(DIRECT_COPY_SQL), server_log.count(COPY_SQL)
    assert direct + staged == 1, (direct, staged)
    # (the writability probe's zero-row INSERT names fewer columns: not counted here)
    assert server_log.count(f"INSERT INTO positions ({COLUMNS})") == staged + len(sizes[1:])
    assert "ERROR:" not in server_log, server_log[server_log.index("ERROR:") - 200:][:1000]

    rows = _execute(pg.url, "SELECT device_id, (extract(epoch FROM ts) * 1000)::bigint, attributes, "
                            "attributes->>'text' FROM positions")
    stored = {(device, ts): (attrs, text) for device, ts, attrs, text in rows}
    expected = {**copy_entries, **{(d, ts): i - 1000 for (d, ts), i in values_entries.items()}}
    assert set(stored) == set(expected)
    for key, i in expected.items():
        assert stored[key] == ({**AWKWARD_ATTRIBUTES, "i": i}, AWKWARD_ATTRIBUTES["text"]), key
    assert sorted({device for device, _ in stored}) == sorted(AWKWARD_DEVICES)
    assert redis_client.xlen(keys["dead"]) == 0


_EXECUTE_CALLS = {"execute", "executemany", "execute_values", "execute_batch", "copy_expert", "copy_from",
                  "copy_to", "mogrify"}
_SQL_TEXT = re.compile(r"\b(SELECT|INSERT|UPDATE|DELETE|COPY|CREATE|ALTER|DROP|TRUNCATE|GRANT|SET)\b")


def _product_modules() -> list[tuple[Path, ast.Module]]:
    return [(path, ast.parse(path.read_text(encoding="utf-8"), str(path)))
            for path in sorted((ROOT / "processor").rglob("*.py"))]


def _module_constants(tree: ast.Module) -> dict[str, ast.expr]:
    return {target.id: node.value for node in tree.body if isinstance(node, ast.Assign)
            for target in node.targets if isinstance(target, ast.Name) and target.id.isupper()}


def _formatted_from_constants(node: ast.expr, constants: dict[str, ast.expr]) -> bool:
    """True for a literal, or an f-string whose every {value} is a module constant built the same way."""
    if isinstance(node, ast.Constant):
        return True
    if isinstance(node, ast.JoinedStr):
        return all(isinstance(v, ast.Constant) or (
            isinstance(v, ast.FormattedValue) and isinstance(v.value, ast.Name) and v.value.id in constants
            and _formatted_from_constants(constants[v.value.id], constants)) for v in node.values)
    return False


def _is_psycopg2_sql(node: ast.expr) -> bool:
    """sql.SQL(...), sql.Identifier(...), and their .format()/.join() compositions."""
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
        func = node.func
        if func.attr in ("format", "join", "as_string"):
            return _is_psycopg2_sql(func.value)
        return isinstance(func.value, ast.Name) and func.value.id == "sql"
    return False


def test_no_sql_text_is_built_from_runtime_values():
    offences: list[str] = []
    checked = 0
    for path, tree in _product_modules():
        constants = _module_constants(tree)
        where = path.relative_to(ROOT)
        # Module-level SQL constants: literals, or f-strings of other constants only.
        for name, value in constants.items():
            text = ast.unparse(value)
            if _SQL_TEXT.search(text) and not _formatted_from_constants(value, constants) \
                    and not isinstance(value, (ast.Tuple, ast.Dict, ast.Set, ast.List, ast.Call)):
                offences.append(f"{where}: {name} = {text[:80]}")
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call) or not node.args:
                continue
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if name not in _EXECUTE_CALLS:
                continue
            # execute_values(cur, sql, rows): the statement is the second argument
            arg = node.args[1] if name in ("execute_values", "execute_batch") and len(node.args) > 1 else node.args[0]
            checked += 1
            if isinstance(arg, (ast.JoinedStr, ast.BinOp)) or (
                    isinstance(arg, ast.Call) and isinstance(arg.func, ast.Attribute)
                    and arg.func.attr == "format" and not _is_psycopg2_sql(arg)):
                offences.append(f"{where}:{node.lineno}: {ast.unparse(node)[:100]}")
            elif isinstance(arg, ast.Name) and arg.id in constants \
                    and not _formatted_from_constants(constants[arg.id], constants):
                offences.append(f"{where}:{node.lineno}: {arg.id} is not a constant statement")
    assert checked >= 6, f"only {checked} execute calls found: the scan is broken"
    assert offences == []
    # The plain grep the issue asks for, too.
    pattern = re.compile(r"""\.execute\(\s*f["']|\.execute\(\s*["'][^"']*["']\s*%|\.execute\([^)]*\.format\(""")
    for path, _ in _product_modules():
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            assert not pattern.search(line), f"{path}:{number}: {line.strip()}"


# --- 4. least privilege ----------------------------------------------------------------------

def _readme_sql_block() -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    match = re.search(r"\*\*Least privilege\.\*\*.*?```sql\n(.*?)```", text, re.S)
    assert match, "README.md has no SQL block under **Least privilege.**"
    return match.group(1)


def _readme_least_privilege_sql() -> list[str]:
    lines = [line for line in _readme_sql_block().splitlines() if not line.strip().startswith("--")]
    return [s.strip() for s in "\n".join(lines).split(";") if s.strip()]


def _readme_roles(throwaway_postgres_factory, redis_url: str, keys: dict[str, str]
                  ) -> tuple[Any, dict[str, str], str, dict[str, str]]:
    """A server set up exactly as the README says: (server, role -> URL, the writer role, base env)."""
    statements = _readme_least_privilege_sql()
    text = "\n".join(statements)
    passwords = dict(re.findall(r"CREATE ROLE (\w+) LOGIN PASSWORD '([^']*)'", text))
    writer = re.search(r"GRANT SELECT, INSERT ON positions TO (\w+)", text).group(1)
    owner = re.search(r"GRANT CREATE ON SCHEMA public TO (\w+)", text).group(1)
    assert set(passwords) == {owner, writer}
    pg = throwaway_postgres_factory(password="admin-pw", schema=False)
    urls = {role: f"postgresql://{role}:{pw}@127.0.0.1:{pg.port}/postgres" for role, pw in passwords.items()}
    base = _env(redis_url, urls[owner], keys)
    if pg.preloads_timescaledb:  # the README's step 0, given in a comment since it is for TimescaleDB only
        step0 = re.search(r"^-- 0\. on TimescaleDB only.*\n--\s+(CREATE EXTENSION [^;]+);", _readme_sql_block(),
                          re.MULTILINE)
        assert step0, "README.md's least-privilege block has no step 0 for TimescaleDB"
        _execute(pg.url, step0.group(1))
    # The README's statements in its order; "run migrate as the owner" comes when the table is first needed.
    migrated = False
    for statement in statements:
        if "positions" in statement and not migrated:
            run = _cli(base, "migrate")
            assert run.returncode == 0, run.stderr
            migrated = True
        _execute(pg.url, statement)
    assert migrated
    assert _execute(pg.url, "SELECT tableowner FROM pg_tables WHERE tablename = 'positions'") == [(owner,)]
    assert_backend(pg.url, "timescaledb" if pg.preloads_timescaledb else "plain")
    return pg, urls, writer, base


def test_least_privilege_roles_from_the_readme(throwaway_postgres_factory, throwaway_redis, keys):
    pg, urls, writer, base = _readme_roles(throwaway_postgres_factory, throwaway_redis.url, keys)
    # The writer role can do what the service needs and nothing more.
    for sql in ("DELETE FROM positions", "UPDATE positions SET speed = 0", "CREATE TABLE intruder (x int)",
                "ALTER TABLE positions ADD COLUMN x int", "TRUNCATE positions"):
        with pytest.raises(psycopg2.errors.InsufficientPrivilege):
            _execute(urls[writer], sql)
    # `migrate` as that role: exit 1, one line naming the missing privilege.
    run = _cli({**base, "POSTGRES_URL": urls[writer]}, "migrate")
    assert run.returncode == 1 and "permission denied for schema public" in run.stderr, run.stderr

    client = throwaway_redis.client()
    publish(client, keys["stream"], [payload(f"lp{i}", BASE_MS + i) for i in range(30)])
    env = {**base, "POSTGRES_URL": urls[writer], "MIGRATE_ON_START": "false"}
    with ServiceProcess(env) as proc:
        wait_until(lambda: row_count(pg.url) == 30, 30, 0.1, "rows written by the INSERT/SELECT role")
        wait_until(lambda: pending_count(client, keys["stream"], keys["group"]) == 0, 10)
        assert _stop(proc) == 0
        messages = proc.messages()
    assert "migrations skipped (MIGRATE_ON_START=false)" in messages
    assert not any("permission denied" in m for m in messages), messages

    # The same role with MIGRATE_ON_START=true cannot apply schema.sql: the service logs one error and
    # exits 1 before reading anything, so nothing is lost and systemd or Docker restart it (the next test
    # checks the wording).
    publish(client, keys["stream"], [payload("lp-late", BASE_MS)])
    with ServiceProcess({**env, "MIGRATE_ON_START": "true"}) as proc:
        assert proc.wait(30) == 1
        logs = proc.logs()
    errors = [entry for entry in logs if entry.get("level") == "error"]
    assert errors and any("permission denied for schema public" in json.dumps(e) for e in errors), logs
    assert row_count(pg.url) == 30
    assert pending_count(client, keys["stream"], keys["group"]) == 0 and client.xlen(keys["stream"]) == 31
    client.close()


def test_migration_refused_for_lack_of_privilege_is_one_clear_error(throwaway_postgres_factory, throwaway_redis,
                                                                     keys):
    _, urls, writer, base = _readme_roles(throwaway_postgres_factory, throwaway_redis.url, keys)
    with ServiceProcess({**base, "POSTGRES_URL": urls[writer], "MIGRATE_ON_START": "true"}) as proc:
        assert proc.wait(30) == 1
        errors = [entry for entry in proc.logs() if entry.get("level") == "error"]
    assert len(errors) == 1, errors
    assert "permission denied for schema public" in errors[0]["msg"], errors
    assert "MIGRATE_ON_START" in errors[0]["msg"], errors
    assert "unexpected" not in errors[0]["msg"] and "exc" not in errors[0], errors


# --- 5. metrics endpoint ---------------------------------------------------------------------

def _listening_addresses(port: int) -> set[str]:
    """Local addresses with a LISTEN socket on ``port`` (from /proc/net/tcp and tcp6)."""
    found: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            local, state = line.split()[1], line.split()[3]
            address, hex_port = local.split(":")
            if state == "0A" and int(hex_port, 16) == port:
                raw = bytes.fromhex(address)
                if len(raw) == 4:
                    found.add(socket.inet_ntop(socket.AF_INET, raw[::-1]))
                else:  # four little-endian 32-bit words
                    words = b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4))
                    found.add(socket.inet_ntop(socket.AF_INET6, words))
    return found


def _connects(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=2):
            return True
    except OSError:
        return False


def _other_local_addresses() -> list[str]:
    """127.0.0.2 (all of 127/8 is this machine on Linux) and the first non-loopback IPv4 address, if any."""
    addresses = ["127.0.0.2"]
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.connect(("192.0.2.1", 9))  # no packet is sent: it only picks the outgoing address
            own = probe.getsockname()[0]
        if not own.startswith("127."):
            addresses.append(own)
    except OSError:
        pass
    return addresses


def test_metrics_endpoint_binds_only_where_told(service_env):
    others = _other_local_addresses()
    # The probe can succeed: a socket on every address answers on each of them.
    with socket.socket() as control:
        control.bind(("0.0.0.0", 0))
        control.listen()
        assert all(_connects(address, control.getsockname()[1]) for address in others)
    port = free_port()
    env = {**service_env, "METRICS_HOST": "127.0.0.1", "METRICS_PORT": str(port)}
    with ServiceProcess(env) as proc:
        proc.wait_for_log("processor ready")
        assert http_get(f"http://127.0.0.1:{port}/metrics")[0] == 200
        listening = _listening_addresses(port)
        reachable = [address for address in others if _connects(address, port)]
        assert _stop(proc) == 0
        messages = proc.messages()
    assert listening == {"127.0.0.1"}
    assert reachable == []
    assert f"metrics on http://127.0.0.1:{port}/metrics" in messages


# --- 6. edge inputs --------------------------------------------------------------------------

def _nested(depth: int) -> bytes:
    """A valid position whose attributes nest ``depth`` objects deep (the attributes object is level 1)."""
    head = json.loads(payload("nested-dev", BASE_MS))
    text = json.dumps(head)[:-1] + ', "attributes": ' + '{"a": ' * (depth - 1) + "{}" + "}" * (depth - 1) + "}"
    return text.encode()


def _edge_entries() -> list[tuple[str, dict[bytes, bytes], str, str]]:
    """(name, entry fields, reason, words of the detail) for each edge input."""
    ten_mb = b'{"device_id": "big", "pad": "' + b"x" * (10 * 1024 * 1024) + b'"}'
    many = {b"payload": payload("many-fields", BASE_MS), **{f"f{i}".encode(): b"v" for i in range(9_999)}}
    invalid_utf8 = payload("utf8-dev", BASE_MS).replace(b"utf8-dev", b"utf8-\xff\xfe-dev")
    return [
        ("10 MB payload", {b"payload": ten_mb}, TOO_LARGE, "MAX_PAYLOAD_BYTES=65536"),
        ("10,000 fields", many, TOO_LARGE, f"10000 fields, more than the limit of {MAX_FIELDS}"),
        ("depth 1,000", {b"payload": _nested(1000)}, TOO_LARGE, f"deeper than {MAX_ATTRIBUTE_DEPTH} levels"),
        ("invalid UTF-8", {b"payload": invalid_utf8}, INVALID_JSON, "not valid JSON"),
    ]


def test_edge_inputs_are_rejected_quickly_by_the_decoder():
    decoder = Decoder()
    assert isinstance(decoder.decode({b"payload": _nested(MAX_ATTRIBUTE_DEPTH)}), Position)  # the limit itself
    for name, fields, reason, words in _edge_entries() + [
            ("depth 2,000 arrays", {b"payload": b'{"attributes": ' + b"[" * 2000 + b"]" * 2000 + b"}"},
             INVALID_JSON, "not valid JSON")]:
        started = time.perf_counter()
        result = decoder.decode(fields)
        elapsed = time.perf_counter() - started
        assert isinstance(result, Rejection) and result.reason == reason, (name, result)
        assert words in result.detail, (name, result.detail)
        assert elapsed < 0.1, f"{name}: decode took {elapsed * 1000:.1f} ms"


def test_edge_inputs_end_to_end_keep_memory_bounded(service_env, redis_client, pg_url, keys):
    with ServiceProcess(service_env) as proc:
        proc.wait_for_log("processor ready")
        publish(redis_client, keys["stream"], [payload(f"warm{i % 50}", BASE_MS + i) for i in range(2000)])
        wait_until(lambda: row_count(pg_url) == 2000, 30, 0.1, "the warm-up rows")
        wait_until(lambda: pending_count(redis_client, keys["stream"], keys["group"]) == 0, 10)
        time.sleep(0.5)
        normal_kb, warm_peak_kb = _vm_kb(proc.proc.pid), _vm_kb(proc.proc.pid, "VmHWM")

        edges = _edge_entries()
        for _, fields, _, _ in edges:
            redis_client.xadd(keys["stream"], fields)
        wait_until(lambda: redis_client.xlen(keys["dead"]) == len(edges), 30, 0.1, "the edge inputs dead-lettered")
        publish(redis_client, keys["stream"], [payload("after", BASE_MS + i) for i in range(10)])
        wait_until(lambda: row_count(pg_url) == 2010, 30, 0.1, "positions after the edge inputs")
        wait_until(lambda: pending_count(redis_client, keys["stream"], keys["group"]) == 0, 10)
        time.sleep(0.5)
        after_kb, peak_kb = _vm_kb(proc.proc.pid), _vm_kb(proc.proc.pid, "VmHWM")
        assert _stop(proc) == 0
    letters = dead_letters(redis_client, keys["dead"])
    assert [(d["reason"].decode(), words in d["detail"].decode()) for d, (_, _, _, words) in zip(letters, edges)] \
        == [(reason, True) for _, _, reason, _ in edges]
    assert len(letters[0]["payload"]) > 10 * 1024 * 1024  # the original bytes are kept, for a redrive
    print(f"\nservice RSS: {normal_kb / 1024:.1f} MB after warm-up, {after_kb / 1024:.1f} MB after the edge "
          f"inputs (peak {warm_peak_kb / 1024:.1f} MB before them, {peak_kb / 1024:.1f} MB after)")
    assert after_kb < normal_kb + 50 * 1024, f"RSS grew from {normal_kb} kB to {after_kb} kB"
