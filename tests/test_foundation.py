"""Foundation: configuration, the schema and migrate, the command line's first contact (issue 2)."""

from __future__ import annotations

import os
import subprocess
import sys
import threading

import psycopg2
import pytest

from processor.core.config import VARIABLES, Config, load_config
from processor.core.errors import ConfigError
from tests.helpers import ROOT
from tests.servers import assert_backend

CONTRACT_COLUMNS = [
    # name, type, not null, has default
    ("device_id", "text", True, False),
    ("ts", "timestamp with time zone", True, False),
    ("latitude", "double precision", True, False),
    ("longitude", "double precision", True, False),
    ("altitude", "real", False, False),
    ("angle", "real", False, False),
    ("speed", "real", False, False),
    ("satellites", "smallint", False, False),
    ("priority", "smallint", False, False),
    ("event_id", "integer", False, False),
    ("attributes", "jsonb", True, True),
    ("received_at", "timestamp with time zone", True, True),
]


def _cli(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if k not in VARIABLES}
    full_env.update(env or {})
    return subprocess.run([sys.executable, str(ROOT / "processor.py"), *args], cwd=str(ROOT), env=full_env,
                          capture_output=True, text=True, timeout=timeout)


# --- configuration ---

def test_defaults_match_the_contract():
    cfg = load_config({}, dotenv_path=None)
    assert (cfg.redis_url, cfg.postgres_url) == ("redis://localhost:6379/0",
                                                 "postgresql://postgres@localhost:5432/postgres")
    assert (cfg.stream_key, cfg.consumer_group, cfg.dead_letter_stream) == ("telemetry:t", "processor",
                                                                            "telemetry:t:dead")
    assert (cfg.batch_size, cfg.block_ms, cfg.writer_threads, cfg.max_inflight_batches) == (1000, 1000, 2, 4)
    assert (cfg.device_state_max, cfg.reclaim_idle_ms, cfg.max_deliveries) == (100_000, 60_000, 5)
    assert (cfg.max_payload_bytes, cfg.max_future_skew_s) == (65536, 86400)
    assert (cfg.metrics_host, cfg.metrics_port, cfg.log_level, cfg.log_format) == ("0.0.0.0", 9464, "info", "json")
    assert cfg.shutdown_timeout_s == 15 and cfg.migrate_on_start is True
    assert cfg.consumer_name  # the host name


@pytest.mark.parametrize("name, value, message", [
    ("BATCH_SIZE", "abc", "BATCH_SIZE must be a positive integer, got 'abc'"),
    ("BATCH_SIZE", "0", "BATCH_SIZE must be a positive integer, got '0'"),
    ("LOG_FORMAT", "xml", "LOG_FORMAT must be one of json, text, got 'xml'"),
    ("METRICS_PORT", "70000", "METRICS_PORT must be an integer from 0 to 65535 (0 disables the server), got '70000'"),
    ("LOG_LEVEL", "loud", "LOG_LEVEL must be one of debug, info, warning, error, critical, got 'loud'"),
    ("REDIS_URL", "http://x", "REDIS_URL must be a redis://, rediss:// or unix:// URL, got 'http://x'"),
    ("MIGRATE_ON_START", "maybe", "MIGRATE_ON_START must be true or false, got 'maybe'"),
    ("SHUTDOWN_TIMEOUT_S", "-1", "SHUTDOWN_TIMEOUT_S must be a positive number (seconds), got '-1'"),
])
def test_bad_values_name_the_variable_and_what_it_accepts(name, value, message):
    with pytest.raises(ConfigError) as info:
        load_config({name: value}, dotenv_path=None)
    assert str(info.value) == message


@pytest.mark.parametrize("name, value", [("BATCH_SIZE", "abc"), ("LOG_FORMAT", "xml"), ("METRICS_PORT", "70000")])
def test_bad_configuration_exits_2_with_one_line(name, value):
    result = _cli("run", env={name: value})
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and name in lines[0] and "Traceback" not in result.stderr, result.stderr
    assert result.stdout == ""


def test_dotenv_is_read_and_the_real_environment_wins(tmp_path):
    (tmp_path / ".env").write_text("BATCH_SIZE=7\nSTREAM_KEY=from-dotenv\n")
    cfg = load_config({"STREAM_KEY": "from-env"}, dotenv_path=str(tmp_path / ".env"))
    assert cfg.batch_size == 7 and cfg.stream_key == "from-env"


def test_a_url_password_is_masked_in_the_config_dump_and_in_errors():
    cfg = load_config({"POSTGRES_URL": "postgresql://app:s3cret-pw@db:5432/x"}, dotenv_path=None)
    assert "s3cret-pw" not in str(cfg.describe())
    with pytest.raises(ConfigError) as info:
        load_config({"REDIS_URL": "http://user:s3cret-pw@host"}, dotenv_path=None)
    assert "s3cret-pw" not in str(info.value)


def test_every_variable_has_a_config_field():
    names = {f for f in Config.__dataclass_fields__}
    assert len(VARIABLES) == len(names)


# --- schema and migrate ---

def _columns(url: str) -> list[tuple[str, str, bool, bool]]:
    conn = psycopg2.connect(url)
    with conn.cursor() as cur:
        cur.execute("""SELECT column_name, data_type, is_nullable = 'NO', column_default IS NOT NULL
                       FROM information_schema.columns WHERE table_name = 'positions' ORDER BY ordinal_position""")
        rows = cur.fetchall()
        cur.execute("""SELECT array_agg(a.attname ORDER BY array_position(i.indkey, a.attnum))
                       FROM pg_index i JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey)
                       WHERE i.indrelid = 'positions'::regclass AND i.indisprimary""")
        pk = cur.fetchone()[0]
        cur.execute("""SELECT count(*) FROM information_schema.tables
                       WHERE table_schema = 'public' AND table_name <> 'positions'""")
        others = cur.fetchone()[0]
    conn.close()
    assert pk == ["device_id", "ts"]
    assert others == 0, "schema.sql must create positions only"
    return rows


def test_migrate_twice_exits_0_and_the_table_matches_the_contract(empty_pg_url):
    for _ in range(2):
        result = _cli("migrate", env={"POSTGRES_URL": empty_pg_url})
        assert result.returncode == 0, result.stderr
        assert "migrations applied" in result.stderr
    assert _columns(empty_pg_url) == CONTRACT_COLUMNS


def test_two_migrates_started_at_the_same_moment_both_exit_0(empty_pg_url):
    results: list[subprocess.CompletedProcess[str]] = []
    barrier = threading.Barrier(3)

    def one() -> None:
        barrier.wait()
        results.append(_cli("migrate", env={"POSTGRES_URL": empty_pg_url}))

    threads = [threading.Thread(target=one) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert [r.returncode for r in results] == [0, 0, 0], [r.stderr for r in results]
    assert _columns(empty_pg_url) == CONTRACT_COLUMNS


# What the second run of schema.sql says on each backend.
SECOND_RUN_NOTICE = {"plain": "positions is a plain PostgreSQL table",
                     "timescaledb": 'table "positions" is already a hypertable, skipping'}


def test_psql_f_schema_sql_twice_works(empty_pg_url, pg_backend):
    for _ in range(2):
        result = subprocess.run(["psql", "-v", "ON_ERROR_STOP=1", "-q", "-f", str(ROOT / "schema.sql"),
                                 empty_pg_url], capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr
    assert SECOND_RUN_NOTICE[pg_backend] in result.stderr
    assert _columns(empty_pg_url) == CONTRACT_COLUMNS
    assert_backend(empty_pg_url, pg_backend)


def test_the_packaged_schema_is_the_top_level_schema():
    assert (ROOT / "schema.sql").read_text() == (ROOT / "processor" / "schema.sql").read_text()


def test_migrate_against_an_unreachable_server_exits_1_with_one_line():
    result = _cli("migrate", env={"POSTGRES_URL": "postgresql://postgres@127.0.0.1:1/postgres"})
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert "cannot reach PostgreSQL" in result.stderr


def test_version_is_printed():
    from processor import __version__

    result = _cli("--version")
    assert result.returncode == 0 and result.stdout.strip() == f"telemetry-processor {__version__}"
