"""The side-by-side benchmark (issues 6, 12, 13): one command, one run, everything on the same machine and data.

    .venv/bin/python bench/run.py [--quick] [--out bench/results.json] [--backends plain,timescaledb]

Every section runs once per backend, each in its own fresh database of that kind:

- ``plain``: a plain ``positions`` table on the server of POSTGRES_URL (the machine's PostgreSQL);
- ``timescaledb``: ``positions`` as a TimescaleDB hypertable (1-day chunks, from the same
  ``schema.sql``), on ``--timescaledb-url`` if given, else on a throwaway PostgreSQL started
  here with ``timescaledb`` preloaded and the plain server's performance settings copied
  (shared_buffers, fsync, WAL and checkpoint settings...), so that the two columns differ
  by the table kind only. Skipped, with the reason in the JSON and the table, when the
  extension is not installed.

Contenders and measures (each on a fresh database and a fresh stream):

1. catch-up: the real service (``python processor.py``) started on a stream that
   already holds every position; timed from process start until the group has
   no lag and nothing pending (every entry acknowledged, hence every row committed),
   and separately from its first read (start-up excluded);
2. ceiling: the same rows, decoded and formatted beforehand, loaded by one
   server-side ``COPY positions FROM '<file>'`` (``FROM STDIN`` if the server cannot
   read our file) into a fresh ``positions`` table;
3. baseline: ``bench/baseline.py``, the consumer people write first, timed like 1;
4. latency: positions offered at a steady rate to a running service; per row,
   ``received_at`` minus the entry id's time from the database (``received_at`` is
   ``now()``, the writing transaction's start: a lower bound of commit time), and the
   service's own ``processor_end_to_end_seconds`` histogram (observed when the main
   loop settles the batch, after commit: an upper bound);
5. memory: VmHWM of the service after positions from ``memory_devices`` devices;
6. scale-out: 1, 2 and 3 instances in one group, timed like 1.

``--py-spy DIR`` adds one more catch-up per backend, after the timed ones (the sampler
takes CPU too, so it never runs during a timed section), profiled by ``py-spy record``
(``pip install py-spy``; not a dependency): ``DIR/<backend>.txt`` in py-spy's raw
(collapsed) format, summarised by ``bench/profile_summary.py``.

Prints a table and writes the JSON (``--out``). Uses REDIS_URL and POSTGRES_URL
(a maintenance database: CREATE DATABASE is run there), localhost defaults.
"""

from __future__ import annotations

import argparse
import compileall
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import orjson  # noqa: E402
import psycopg2  # noqa: E402
import redis  # noqa: E402

from processor.core.db import schema_sql  # noqa: E402
from processor.core.decode import Decoder, dumps_attributes  # noqa: E402
from processor.core.types import Position  # noqa: E402
from processor.simulate import Fleet  # noqa: E402
import gateway as gateway_bench  # noqa: E402  (bench/gateway.py: the live gateway's section)

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
DEFAULT_POSTGRES_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
COLUMNS = ("device_id, ts, latitude, longitude, altitude, angle, speed, satellites, priority, "
           "event_id, attributes")
POLL_S = 0.01  # how often the group's lag and pending count are read while a contender runs
SEED = 6  # the number: the same fleet on every run
# Issue 13's targets (ratios within one run, on each backend; latency and memory: no regression).
TARGETS = {"catch_up_vs_ceiling": 0.45, "catch_up_vs_baseline": 4.0, "latency_p99_ms": 100.0,
           "peak_rss_mb": 200.0}
BACKENDS = ("plain", "timescaledb")
BACKEND_LABELS = {"plain": "plain PostgreSQL table", "timescaledb": "TimescaleDB hypertable"}
# Copied from the plain server to the throwaway TimescaleDB one: what changes a write's cost.
COPIED_SETTINGS = ("shared_buffers", "fsync", "full_page_writes", "synchronous_commit", "wal_level",
                   "wal_buffers", "max_wal_size", "min_wal_size", "checkpoint_timeout",
                   "checkpoint_completion_target", "autovacuum", "jit", "work_mem", "maintenance_work_mem",
                   "wal_compression", "effective_io_concurrency")


@dataclass(frozen=True)
class Scale:
    positions: int  # catch-up, ceiling, baseline, scale-out
    devices: int
    latency_rate: int  # positions a second offered in the latency run
    latency_seconds: float
    memory_devices: int  # one position each
    instances: tuple[int, ...]
    timeout_s: float  # any single wait


FULL = Scale(positions=200_000, devices=10_000, latency_rate=5_000, latency_seconds=30.0,
             memory_devices=100_000, instances=(1, 2, 3), timeout_s=240.0)
QUICK = Scale(positions=2_000, devices=200, latency_rate=1_000, latency_seconds=2.0,
              memory_devices=2_000, instances=(1, 2, 3), timeout_s=60.0)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# --- the servers ---------------------------------------------------------------------------

class Bench:
    """One backend's server, the run's unique names, and clean-up of every database and key it made.

    ``backend`` says what kind of ``positions`` its fresh databases must hold (checked on
    each). Benches of one run share Redis and the work directory (the template streams,
    the COPY file): only the one that made the directory removes it.
    """

    def __init__(self, redis_url: str, admin_url: str, *, backend: str = "plain",
                 workdir: Path | None = None) -> None:
        self.redis_url = redis_url
        self.admin_url = admin_url
        self.backend = backend
        self.redis = redis.Redis.from_url(redis_url)
        self.tag = uuid.uuid4().hex[:8]
        self._owns_workdir = workdir is None
        self.workdir = workdir if workdir is not None else Path(tempfile.mkdtemp(prefix="bench-"))
        self._databases: list[str] = []
        self._keys: list[str] = []
        self._counter = 0

    def name(self, what: str) -> str:
        self._counter += 1
        return f"bench_{self.tag}_{self._counter}_{what}"

    def key(self, what: str) -> str:
        key = f"bench:{self.tag}:{self._counter}:{what}"
        self._keys.append(key)
        return key

    def admin(self, sql: str) -> None:
        conn = psycopg2.connect(self.admin_url)
        conn.autocommit = True
        try:
            with conn.cursor() as cur:
                cur.execute(sql)
        finally:
            conn.close()

    def fresh_database(self, what: str) -> str:
        """CREATE DATABASE and apply the schema; returns its URL. Raises if ``positions`` is not
        of the bench's kind (a hypertable for ``timescaledb``, a plain table for ``plain``)."""
        name = self.name(what)
        self.admin(f'CREATE DATABASE "{name}"')
        self._databases.append(name)
        url = urlunsplit(urlsplit(self.admin_url)._replace(path="/" + name))
        conn = psycopg2.connect(url)
        conn.autocommit = True
        try:
            with conn.cursor() as cur:
                cur.execute("SET client_min_messages = error")  # schema.sql's plain-table WARNING
                cur.execute(schema_sql())
            kind = table_kind(conn)
        finally:
            conn.close()
        wanted = "hypertable" if self.backend == "timescaledb" else "plain"
        if kind != wanted:
            raise RuntimeError(f"{self.backend}: positions in {name} is a {kind} table, not {wanted}")
        return url

    def drop_database(self, url: str) -> None:
        name = urlsplit(url).path.lstrip("/")
        self.admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        if name in self._databases:
            self._databases.remove(name)

    def checkpoint(self) -> None:
        """Flush dirty pages before a timed run, so that no contender pays for the previous one's."""
        try:
            self.admin("CHECKPOINT")
        except psycopg2.Error as exc:  # not a superuser: carry on, a little noisier
            log(f"CHECKPOINT not allowed ({exc.pgerror or exc}); runs may be noisier")

    def close(self) -> None:
        for name in list(self._databases):
            self.admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        if self._keys:
            self.redis.delete(*self._keys)
        self.redis.close()
        if self._owns_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)


def table_kind(conn: Any) -> str:
    """``hypertable`` when ``positions`` is one (TimescaleDB), else ``plain``."""
    with conn.cursor() as cur:
        cur.execute("SELECT EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'timescaledb')")
        if not cur.fetchone()[0]:
            return "plain"
        cur.execute("SELECT count(*) FROM timescaledb_information.hypertables WHERE hypertable_name = 'positions'")
        return "hypertable" if cur.fetchone()[0] else "plain"


def server_settings(admin_url: str, names: Sequence[str] = COPIED_SETTINGS) -> dict[str, str]:
    """The named settings of a server, as ``postgresql.conf`` values (units included, quoted)."""
    conn = psycopg2.connect(admin_url)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT name, current_setting(name) FROM pg_settings WHERE name = ANY(%s)", (list(names),))
            return {name: "'" + value.replace("'", "''") + "'" for name, value in cur.fetchall()}
    finally:
        conn.close()


def timescaledb_missing(timescaledb_url: str | None) -> str | None:
    """Why there can be no TimescaleDB backend here, or None: a given server, or the library beside
    this machine's PostgreSQL for a throwaway one (the test suite's own check)."""
    if timescaledb_url:
        return None
    from processor.devservers import postgres_bindir, timescaledb_installed
    if postgres_bindir() is None:
        return "PostgreSQL server binaries (initdb, postgres) are not installed"
    if not timescaledb_installed():
        return "the TimescaleDB library is not installed beside this PostgreSQL"
    return None


@contextmanager
def timescaledb_server(plain_url: str, url: str | None) -> Iterator[tuple[str, dict[str, Any]]]:
    """(maintenance URL, description) of a TimescaleDB server: ``url`` if given, else a throwaway
    one with timescaledb preloaded and the plain server's performance settings."""
    if url:
        yield url, {"server": "given (--timescaledb-url)"}
        return
    from processor.devservers import TIMESCALEDB_SETTINGS, ThrowawayPostgres
    settings = server_settings(plain_url)
    settings.update(TIMESCALEDB_SETTINGS)  # as the test suite's servers: preloaded, telemetry off, no jobs
    settings["max_connections"] = "100"
    server = ThrowawayPostgres(settings=settings)
    try:
        server.start()
        yield server.url, {"server": "throwaway, settings copied from the plain server",
                           "settings": {k: v.strip("'") for k, v in settings.items()}}
    finally:
        server.cleanup()


def count_rows(url: str) -> int:
    conn = psycopg2.connect(url)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT count(*) FROM positions")
            return int(cur.fetchone()[0])
    finally:
        conn.close()


def machine(bench: Bench) -> dict[str, Any]:
    conn = psycopg2.connect(bench.admin_url)
    with conn.cursor() as cur:
        cur.execute("SHOW server_version")
        pg_version = cur.fetchone()[0]
    conn.close()
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        import hiredis
        hiredis_version: str | None = hiredis.__version__
    except ImportError:
        hiredis_version = None
    return {
        "cores": len(os.sched_getaffinity(0)), "cpu": cpu, "platform": platform.platform(),
        "python": platform.python_version(), "postgresql": pg_version,
        "redis": bench.redis.info("server")["redis_version"], "redis_py": redis.__version__,
        "hiredis": hiredis_version, "psycopg2": psycopg2.__version__.split()[0], "orjson": orjson.__version__,
        "msgspec": _version_of("msgspec"),
    }


def _version_of(module: str) -> str | None:
    try:
        return str(__import__(module).__version__)
    except ImportError:
        return None


# --- the data ------------------------------------------------------------------------------

def publish(client: redis.Redis, stream: str, payloads: Sequence[bytes], chunk: int = 1000) -> list[bytes]:
    """XADD each payload as the field ``payload``; the entry ids."""
    ids: list[bytes] = []
    pipe = client.pipeline(transaction=False)
    for start in range(0, len(payloads), chunk):
        for payload in payloads[start:start + chunk]:
            pipe.xadd(stream, {"payload": payload})
        ids.extend(pipe.execute())
    return ids


def copy_stream(bench: Bench, template: str) -> str:
    """A fresh stream holding the template's entries (Redis COPY: no second publish)."""
    stream = bench.key("stream")
    if not bench.redis.copy(template, stream):
        raise RuntimeError(f"COPY {template} {stream} failed")
    return stream


def copy_line(p: Position) -> str:
    """One row of ``positions`` in COPY text format, as the processor's writer formats it."""
    def opt(value: object) -> str:
        return "\\N" if value is None else repr(value)

    device = p.device_id
    if not device.isalnum():
        device = device.replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n").replace("\r", "\\r")
    attrs = dumps_attributes(p.attributes).replace("\\", "\\\\")
    return (f"{device}\t{p.ts.isoformat()}\t{p.latitude!r}\t{p.longitude!r}\t{opt(p.altitude)}\t"
            f"{opt(p.angle)}\t{opt(p.speed)}\t{opt(p.satellites)}\t{opt(p.priority)}\t"
            f"{opt(p.event_id)}\t{attrs}\n")


def format_rows(payloads: Sequence[bytes], path: Path) -> int:
    """Decode every payload as the processor does and write the COPY file; the number of rows."""
    decoder = Decoder()
    now = time.time()
    rows = 0
    with open(path, "w", encoding="utf-8") as out:
        for payload in payloads:
            position = decoder.decode({b"payload": payload}, now)
            if not isinstance(position, Position):
                raise RuntimeError(f"generated payload rejected: {position}")
            out.write(copy_line(position))
            rows += 1
    path.chmod(0o644)  # the server reads it as its own OS user
    return rows


# --- running the service -------------------------------------------------------------------

@dataclass
class Instance:
    proc: subprocess.Popen[bytes]
    started: float  # perf_counter() just before the process was spawned
    log_path: Path


def service_env(bench: Bench, pg_url: str, stream: str, group: str, consumer: str,
                **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("REDIS_", "POSTGRES_"))}
    env.update({"REDIS_URL": bench.redis_url, "POSTGRES_URL": pg_url, "STREAM_KEY": stream,
                "CONSUMER_GROUP": group, "CONSUMER_NAME": consumer,
                "DEAD_LETTER_STREAM": bench.key("dead"), "LOG_LEVEL": "warning", "LOG_FORMAT": "text",
                "METRICS_PORT": "0", "PYTHONUNBUFFERED": "1"})
    env.update(extra)
    return env


def spawn(bench: Bench, argv: list[str], env: dict[str, str], name: str) -> Instance:
    log_path = bench.workdir / f"{name}.log"
    out = open(log_path, "wb")
    started = time.perf_counter()
    # cwd: the work directory, so that no stray .env is read.
    proc = subprocess.Popen(argv, env=env, cwd=bench.workdir, stdout=out, stderr=subprocess.STDOUT)
    out.close()
    return Instance(proc, started, log_path)


def service_argv() -> list[str]:
    return [sys.executable, str(ROOT / "processor.py"), "run"]


def stop(instances: Sequence[Instance], timeout: float = 30.0) -> list[int]:
    """SIGTERM each, wait for all; the exit statuses."""
    for inst in instances:
        if inst.proc.poll() is None:
            inst.proc.send_signal(signal.SIGTERM)
    codes = []
    for inst in instances:
        try:
            codes.append(inst.proc.wait(timeout))
        except subprocess.TimeoutExpired:
            inst.proc.kill()
            codes.append(inst.proc.wait())
    return codes


def tail(inst: Instance, lines: int = 20) -> str:
    try:
        return "\n".join(inst.log_path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def group_info(client: redis.Redis, stream: str, group: str) -> dict[str, Any] | None:
    try:
        groups = client.xinfo_groups(stream)
    except redis.ResponseError:
        return None
    for g in groups:
        name = g["name"].decode() if isinstance(g["name"], bytes) else g["name"]
        if name == group:
            return g
    return None


def wait_drained(client: redis.Redis, stream: str, group: str, total: int, instances: Sequence[Instance],
                 timeout: float) -> tuple[float, float]:
    """Poll the group until all ``total`` entries were read and acknowledged.

    Returns (first read, done) as perf_counter() times: the first poll that saw
    entries read, and the first that saw no lag and nothing pending.
    """
    deadline = time.perf_counter() + timeout
    first_read: float | None = None
    while True:
        now = time.perf_counter()
        info = group_info(client, stream, group)
        if info is not None:
            read = info.get("entries-read") or 0
            if first_read is None and (read or info["pending"]):
                first_read = now
            if read >= total and info["pending"] == 0 and (info.get("lag") or 0) == 0:
                return (first_read or now), now
        for inst in instances:
            if inst.proc.poll() is not None:
                raise RuntimeError(f"contender exited with {inst.proc.returncode}:\n{tail(inst)}")
        if now > deadline:
            raise RuntimeError(f"not drained after {timeout:.0f}s: {info}")
        time.sleep(POLL_S)


def dead_letters(client: redis.Redis, env: dict[str, str]) -> int:
    return int(client.xlen(env["DEAD_LETTER_STREAM"]))


def drain_run(bench: Bench, argvs: Sequence[list[str]], stream: str, total: int, pg_url: str,
              timeout: float, profile: Path | None = None, **extra: str) -> dict[str, Any]:
    """Start one process per argv (one group, distinct consumers), time the drain, stop, count.

    ``profile``: attach py-spy to the first process once it has started (the figures of
    such a run are not comparable: the sampler competes for the CPU)."""
    group = "bench"
    envs = [service_env(bench, pg_url, stream, group, f"bench-{i + 1}", **extra) for i in range(len(argvs))]
    bench.checkpoint()
    redis_cpu = redis_cpu_s(bench.redis)
    instances = [spawn(bench, argv, env, f"{Path(argv[1]).stem}-{i + 1}")
                 for i, (argv, env) in enumerate(zip(argvs, envs))]
    profiler = None
    try:
        if profile is not None:
            wait_consumer(bench.redis, stream, group, "bench-1", instances[0], timeout)
            profiler = start_profiler(instances[0].proc.pid, profile)
        first_read, done = wait_drained(bench.redis, stream, group, total, instances, timeout)
        hwm = [vm_hwm_mb(inst.proc.pid) for inst in instances]
        cpu = cpu_breakdown(instances, pg_url, redis_cpu_s(bench.redis) - redis_cpu, total)
    finally:
        codes = stop(instances)
        if profiler is not None:
            _, err = profiler.communicate(timeout=60)  # py-spy writes its file when the process ends
            if not profile.exists():
                log(f"py-spy wrote no profile: {err.decode(errors='replace')[-500:]}")
    started = instances[0].started
    rows = count_rows(pg_url)
    letters = sum(dead_letters(bench.redis, env) for env in envs)
    if rows != total or letters:
        raise RuntimeError(f"expected {total} rows, found {rows} ({letters} dead letters)")
    return {"positions": total, "rows": rows, "dead_letters": letters,
            "seconds": round(done - started, 3), "per_s": round(total / (done - started), 1),
            "seconds_from_first_read": round(done - first_read, 3),
            "per_s_from_first_read": round(total / max(done - first_read, 1e-9), 1),
            "startup_s": round(first_read - started, 3), "exit_codes": codes,
            "peak_rss_mb": hwm, "cpu_us_per_position": cpu}


# --- where the CPU went -------------------------------------------------------------------

CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _proc_cpu_s(path: str, kernel_only: bool = False) -> float:
    """utime + stime (or stime alone) of a /proc/<pid>[/task/<tid>]/stat file, in seconds (0 when gone)."""
    try:
        fields = Path(path).read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return 0.0
    return (int(fields[12]) + (0 if kernel_only else int(fields[11]))) / CLOCK_TICKS


def redis_cpu_s(client: redis.Redis) -> float:
    """CPU seconds the whole Redis server has used (shared: others' work counts too)."""
    info = client.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


def cpu_breakdown(instances: Sequence[Instance], pg_url: str, redis_s: float, total: int) -> dict[str, float]:
    """Microseconds of CPU per position: the contender's main thread (and the part of it spent in
    the kernel), its other threads, its PostgreSQL backends, and the Redis server, read while they
    are still alive."""
    main = main_kernel = others = 0.0
    for inst in instances:
        pid = inst.proc.pid
        for task in Path(f"/proc/{pid}/task").glob("*"):
            seconds = _proc_cpu_s(f"{task}/stat")
            if task.name == str(pid):
                main += seconds
                main_kernel += _proc_cpu_s(f"{task}/stat", kernel_only=True)
            else:
                others += seconds
    backends = 0.0
    conn = psycopg2.connect(pg_url)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
                        "AND pid <> pg_backend_pid()")
            backends = sum(_proc_cpu_s(f"/proc/{pid}/stat") for (pid,) in cur.fetchall())
    finally:
        conn.close()
    per = 1e6 / total
    return {"main_thread": round(main * per, 1), "main_thread_kernel": round(main_kernel * per, 1),
            "other_threads": round(others * per, 1),
            "postgres_backends": round(backends * per, 1), "redis_server": round(redis_s * per, 1)}


def vm_hwm_mb(pid: int) -> float | None:
    """Peak resident set size of ``pid`` in MB (VmHWM), None where /proc is not there."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        return None
    return None


# --- the contenders ------------------------------------------------------------------------

def run_catch_up(bench: Bench, template: str, scale: Scale, profile: Path | None = None) -> dict[str, Any]:
    pg_url = bench.fresh_database("catchup")
    stream = copy_stream(bench, template)
    try:
        return drain_run(bench, [service_argv()], stream, scale.positions, pg_url, scale.timeout_s,
                         profile=profile)
    finally:
        bench.drop_database(pg_url)
        bench.redis.delete(stream)


PY_SPY_RATE = 250  # samples a second; py-spy's own CPU stays small next to the service's


def start_profiler(pid: int, out: Path) -> subprocess.Popen[bytes]:
    """``py-spy record`` of ``pid`` (every thread, on-CPU samples only) into ``out``, raw format."""
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(py_spy).exists():
        raise RuntimeError("--py-spy needs py-spy (pip install py-spy)")
    out.parent.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen([py_spy, "record", "--pid", str(pid), "--rate", str(PY_SPY_RATE), "--format", "raw",
                             "--threads", "--nonblocking", "--output", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def run_baseline(bench: Bench, template: str, scale: Scale) -> dict[str, Any]:
    pg_url = bench.fresh_database("baseline")
    stream = copy_stream(bench, template)
    try:
        argv = [sys.executable, str(ROOT / "bench" / "baseline.py")]
        return drain_run(bench, [argv], stream, scale.positions, pg_url, scale.timeout_s * 4)
    finally:
        bench.drop_database(pg_url)
        bench.redis.delete(stream)


def run_scale_out(bench: Bench, template: str, scale: Scale) -> list[dict[str, Any]]:
    results = []
    for n in scale.instances:
        pg_url = bench.fresh_database(f"scale{n}")
        stream = copy_stream(bench, template)
        try:
            result = drain_run(bench, [service_argv()] * n, stream, scale.positions, pg_url, scale.timeout_s)
        finally:
            bench.drop_database(pg_url)
            bench.redis.delete(stream)
        result["instances"] = n
        results.append(result)
        log(f"  scale-out {n}: {result['per_s']:,.0f}/s")
    return results


def run_ceiling(bench: Bench, copy_file: Path, rows: int) -> dict[str, Any]:
    """One COPY of every row into a fresh table with the same primary key."""
    pg_url = bench.fresh_database("ceiling")
    try:
        bench.checkpoint()
        conn = psycopg2.connect(pg_url)
        try:
            mode, seconds = _timed_copy(conn, copy_file)
        finally:
            conn.close()
        found = count_rows(pg_url)
    finally:
        bench.drop_database(pg_url)
    if found != rows:
        raise RuntimeError(f"ceiling: expected {rows} rows, found {found}")
    return {"positions": rows, "rows": found, "mode": mode, "seconds": round(seconds, 3),
            "per_s": round(rows / seconds, 1)}


def _timed_copy(conn: Any, copy_file: Path) -> tuple[str, float]:
    """Server-side COPY FROM the file; FROM STDIN when the server cannot read it (a remote server)."""
    sql = f"COPY positions ({COLUMNS}) FROM %s"
    with conn.cursor() as cur:
        try:
            started = time.perf_counter()
            cur.execute(sql, (str(copy_file),))
            conn.commit()
            return "server-side COPY FROM file", time.perf_counter() - started
        except psycopg2.Error as exc:
            conn.rollback()
            log(f"  server-side COPY not possible ({(exc.pgerror or str(exc)).strip()}); using FROM STDIN")
    with conn.cursor() as cur, open(copy_file, "rb") as data:
        started = time.perf_counter()
        cur.copy_expert(f"COPY positions ({COLUMNS}) FROM STDIN", data, size=1 << 20)
        conn.commit()
        return "COPY FROM STDIN", time.perf_counter() - started


def run_memory(bench: Bench, template: str, scale: Scale) -> dict[str, Any]:
    """Peak RSS once positions from ``memory_devices`` distinct devices (one each, in ``template``)
    are in the state."""
    devices = scale.memory_devices
    pg_url = bench.fresh_database("memory")
    stream = copy_stream(bench, template)
    port = free_port()
    env = service_env(bench, pg_url, stream, "bench", "bench-1", DEVICE_STATE_MAX=str(devices),
                      METRICS_PORT=str(port), METRICS_HOST="127.0.0.1")
    try:
        bench.checkpoint()
        inst = spawn(bench, service_argv(), env, "memory")
        try:
            wait_drained(bench.redis, stream, "bench", devices, [inst], scale.timeout_s)
            metrics = scrape(port)
            hwm = vm_hwm_mb(inst.proc.pid)
            rss = vm_rss_mb(inst.proc.pid)
        finally:
            code = stop([inst])[0]
        rows = count_rows(pg_url)
    finally:
        bench.drop_database(pg_url)
    tracked = int(metrics.get("processor_devices_tracked", 0))
    if rows != devices or tracked != devices:
        raise RuntimeError(f"memory: expected {devices} rows and devices, found {rows} rows, {tracked} devices")
    return {"devices": devices, "rows": rows, "devices_tracked": tracked, "peak_rss_mb": hwm,
            "rss_mb_after": rss, "device_state_max": devices, "exit_code": code}


def vm_rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        return None
    return None


# --- latency -------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def scrape(port: int) -> dict[str, float]:
    """The service's /metrics as {sample name with labels: value}."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            samples[name] = float(value)
    return samples


def histogram(samples: dict[str, float], name: str) -> list[tuple[float, float]]:
    """Cumulative (upper bound, count) buckets of a Prometheus histogram, sorted."""
    prefix = f'{name}_bucket{{le="'
    buckets = [(float(k[len(prefix):-2]), v) for k, v in samples.items() if k.startswith(prefix)]
    return sorted(buckets)


def bucket_quantile(buckets: list[tuple[float, float]], q: float) -> float:
    """As PromQL's histogram_quantile: linear inside the bucket that holds the q-th observation."""
    total = buckets[-1][1]
    rank = q * total
    lower, below = 0.0, 0.0
    for upper, count in buckets:
        if count >= rank:
            if upper == float("inf"):
                return lower
            return lower + (upper - lower) * ((rank - below) / max(count - below, 1e-9))
        lower, below = upper, count
    return lower


def wait_consumer(client: redis.Redis, stream: str, group: str, consumer: str, inst: Instance,
                  timeout: float) -> None:
    """Until ``consumer`` shows in the group: it has started reading."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            names = [c["name"] for c in client.xinfo_consumers(stream, group)]
            if consumer.encode() in names or consumer in names:
                return
        except redis.ResponseError:
            pass
        if inst.proc.poll() is not None:
            raise RuntimeError(f"service exited with {inst.proc.returncode}:\n{tail(inst)}")
        time.sleep(0.05)
    raise RuntimeError("the service did not start reading")


def offer(client: redis.Redis, stream: str, rate: int, seconds: float, devices: int
          ) -> tuple[dict[tuple[str, int], int], float]:
    """Publish ``rate`` positions a second for ``seconds``, every 10 ms what is due.

    Returns {(device_id, ts in ms): entry id time in ms} and the rate achieved.
    """
    fleet = Fleet(devices, seed=SEED + 2, live=True)
    sent: dict[tuple[str, int], int] = {}
    pipe = client.pipeline(transaction=False)
    started = time.perf_counter()
    published = 0
    while True:
        elapsed = time.perf_counter() - started
        if elapsed >= seconds:
            break
        due = min(int(elapsed * rate) + 1, int(seconds * rate)) - published
        if due <= 0:
            time.sleep(0.01 - elapsed % 0.01)
            continue
        keys = []
        for position in fleet.positions(due):
            pipe.xadd(stream, {"payload": orjson.dumps(position)})
            keys.append((position["device_id"], _ts_ms(position["timestamp"])))
        for key, entry_id in zip(keys, pipe.execute()):
            sent[key] = int(entry_id.split(b"-")[0])
        published += due
    return sent, published / (time.perf_counter() - started)


def _ts_ms(value: int | str) -> int:
    if isinstance(value, int):
        return value
    return round(datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp() * 1000)


def run_latency(bench: Bench, scale: Scale) -> dict[str, Any]:
    pg_url = bench.fresh_database("latency")
    stream = bench.key("stream")
    port = free_port()
    env = service_env(bench, pg_url, stream, "bench", "bench-1", METRICS_PORT=str(port),
                      METRICS_HOST="127.0.0.1")
    try:
        bench.checkpoint()
        inst = spawn(bench, service_argv(), env, "latency")
        try:
            wait_consumer(bench.redis, stream, "bench", "bench-1", inst, scale.timeout_s)
            sent, achieved = offer(bench.redis, stream, scale.latency_rate, scale.latency_seconds, scale.devices)
            wait_drained(bench.redis, stream, "bench", len(sent), [inst], scale.timeout_s)
            metrics = scrape(port)
        finally:
            code = stop([inst])[0]
        db_ms = _db_latencies(pg_url, sent)
    finally:
        bench.drop_database(pg_url)
    buckets = histogram(metrics, "processor_end_to_end_seconds")
    total = buckets[-1][1]
    within = dict(buckets).get(0.2, 0.0)
    db_ms.sort()
    return {
        "offered_per_s": scale.latency_rate, "achieved_per_s": round(achieved, 1), "seconds": scale.latency_seconds,
        "positions": len(sent), "rows": len(db_ms), "exit_code": code,
        "db_p50_ms": round(_quantile(db_ms, 0.50), 1), "db_p99_ms": round(_quantile(db_ms, 0.99), 1),
        "db_max_ms": round(db_ms[-1], 1),
        "metric_observations": int(total),
        "metric_p50_ms": round(bucket_quantile(buckets, 0.50) * 1000, 1),
        "metric_p99_ms": round(bucket_quantile(buckets, 0.99) * 1000, 1),
        "metric_share_within_200ms": round(within / total, 5) if total else None,
    }


def _db_latencies(pg_url: str, sent: dict[tuple[str, int], int]) -> list[float]:
    """Per row: received_at (the writing transaction's start) minus the entry id's time, in ms."""
    conn = psycopg2.connect(pg_url)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT device_id, (extract(epoch FROM ts) * 1000)::bigint, "
                        "extract(epoch FROM received_at)::float8 * 1000 FROM positions")
            rows = cur.fetchall()
    finally:
        conn.close()
    if len(rows) != len(sent):
        raise RuntimeError(f"latency: expected {len(sent)} rows, found {len(rows)}")
    return [received - sent[(device, ts)] for device, ts, received in rows]


def _quantile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank quantile of an already sorted list."""
    index = min(len(sorted_values) - 1, max(0, int(-(-q * len(sorted_values) // 1)) - 1))
    return sorted_values[index]


# --- the report ----------------------------------------------------------------------------

def summarise(results: dict[str, Any]) -> None:
    """Ratios and target verdicts of one backend's sections, added to ``results``."""
    catch_up, ceiling, baseline = results["catch_up"], results["ceiling"], results["baseline"]
    latency, memory = results["latency"], results["memory"]
    ratios = {
        "catch_up_vs_ceiling": round(catch_up["per_s"] / ceiling["per_s"], 3),
        "catch_up_vs_baseline": round(catch_up["per_s"] / baseline["per_s"], 2),
        "catch_up_from_first_read_vs_ceiling": round(catch_up["per_s_from_first_read"] / ceiling["per_s"], 3),
    }
    p99 = max(latency["db_p99_ms"], latency["metric_p99_ms"])
    results["ratios"] = ratios
    results["targets"] = {
        "catch_up_vs_ceiling": _verdict(ratios["catch_up_vs_ceiling"], ">=", TARGETS["catch_up_vs_ceiling"]),
        "catch_up_vs_baseline": _verdict(ratios["catch_up_vs_baseline"], ">=", TARGETS["catch_up_vs_baseline"]),
        "latency_p99_ms": _verdict(p99, "<=", TARGETS["latency_p99_ms"], f"at {latency['offered_per_s']}/s"),
        "peak_rss_mb": _verdict(memory["peak_rss_mb"], "<=", TARGETS["peak_rss_mb"],
                                f"with {memory['devices']} devices"),
    }


def _verdict(value: float | None, op: str, target: float, where: str = "") -> dict[str, Any]:
    met = value is not None and (value >= target if op == ">=" else value <= target)
    return {"target": f"{op} {target:g} {where}".strip(), "value": value, "met": met}


def _throughput_rows(r: dict[str, Any]) -> list[tuple[str, int, float, float]]:
    """(label, positions, seconds, per s) of one backend's throughput sections, in table order."""
    c, b, top = r["catch_up"], r["baseline"], r["ceiling"]
    rows = [(f"COPY ceiling ({top['mode']})", top["positions"], top["seconds"], top["per_s"]),
            ("processor catch-up (from process start)", c["positions"], c["seconds"], c["per_s"]),
            ("  the same, from its first read", c["positions"], c["seconds_from_first_read"],
             c["per_s_from_first_read"]),
            ("baseline (bench/baseline.py)", b["positions"], b["seconds"], b["per_s"])]
    rows += [(f"scale-out: {s['instances']} instance(s), one group", s["positions"], s["seconds"], s["per_s"])
             for s in r["scale_out"]]
    return rows


def table(results: dict[str, Any]) -> str:
    m = results["machine"]
    backends = results["backends"]
    done = [name for name in backends if "skipped" not in backends[name]]
    lines = [
        f"machine: {m['cores']} cores ({m['cpu']}), {m['platform']}",
        f"versions: Python {m['python']}, PostgreSQL {m['postgresql']}, Redis {m['redis']}, "
        f"redis-py {m['redis_py']} (hiredis {m['hiredis'] or 'not installed'}), psycopg2 {m['psycopg2']}, "
        f"orjson {m['orjson']}, msgspec {m.get('msgspec') or 'not installed'}",
    ]
    for name, r in backends.items():
        if "skipped" in r:
            lines.append(f"{BACKEND_LABELS[name]}: skipped ({r['skipped']})")
        else:
            lines.append(f"{BACKEND_LABELS[name]}: {r['server'].get('server', 'POSTGRES_URL')}"
                         + (f", TimescaleDB {r['server']['timescaledb']}" if r['server'].get('timescaledb') else ""))
    lines.append("")
    head = f"{'throughput (positions/s)':<42}{'positions':>10}"
    for name in done:
        head += f" | {BACKEND_LABELS[name]:^32}"
    lines.append(head)
    sub = f"{'':<52}" + "".join(f" | {'seconds':>8}{'per s':>9}{'x COPY':>7}{'x base':>7} " for _ in done)
    lines.append(sub.rstrip())
    per_backend = {name: _throughput_rows(backends[name]) for name in done}
    if done:
        for i, (label, n, _, _) in enumerate(per_backend[done[0]]):
            line = f"{label:<42}{n:>10,}"
            for name in done:
                r = backends[name]
                _, _, seconds, per_s = per_backend[name][i]
                line += (f" | {seconds:>8.2f}{per_s:>9,.0f}{per_s / r['ceiling']['per_s']:>7.2f}"
                         f"{per_s / r['baseline']['per_s']:>7.2f} ")
            lines.append(line.rstrip())
    for name in done:
        r = backends[name]
        lat, mem, cpu = r["latency"], r["memory"], r["catch_up"]["cpu_us_per_position"]
        lines += [
            "",
            f"{BACKEND_LABELS[name]}:",
            f"  catch-up CPU per position (us): main thread {cpu['main_thread']} (kernel {cpu['main_thread_kernel']}), "
            f"other threads {cpu['other_threads']}, PostgreSQL {cpu['postgres_backends']}, "
            f"Redis {cpu['redis_server']}",
            f"  latency at {lat['offered_per_s']:,}/s offered ({lat['achieved_per_s']:,.0f}/s achieved) for "
            f"{lat['seconds']:.0f} s, {lat['rows']:,} rows:",
            f"    database (received_at - entry id time): p50 {lat['db_p50_ms']:.1f} ms, "
            f"p99 {lat['db_p99_ms']:.1f} ms, max {lat['db_max_ms']:.1f} ms",
            f"    service histogram (after commit):       p50 {lat['metric_p50_ms']:.1f} ms, p99 "
            f"{lat['metric_p99_ms']:.1f} ms (bucket-interpolated), "
            f"{(lat['metric_share_within_200ms'] or 0) * 100:.2f}% within 200 ms",
            f"  memory: peak RSS {mem['peak_rss_mb']} MB with {mem['devices_tracked']:,} devices in state "
            f"(RSS after: {mem['rss_mb_after']} MB)",
            "  targets:",
        ]
        for target, t in r["targets"].items():
            lines.append(f"    {target:<24} {str(t['value']):>10}  (target {t['target']})  "
                         f"{'met' if t['met'] else 'MISSED'}")
    load = results.get("load_average")
    lines.append(f"\ntotal run time {results['total_seconds']:.0f} s"
                 + (f"; load average before {load['before']}, after {load['after']}" if load else ""))
    return "\n".join(lines)


# --- main ----------------------------------------------------------------------------------

@contextmanager
def bench_servers(redis_url: str, admin_url: str, *, backend: str = "plain",
                  workdir: Path | None = None) -> Iterator[Bench]:
    bench = Bench(redis_url, admin_url, backend=backend, workdir=workdir)
    try:
        yield bench
    finally:
        bench.close()


@dataclass
class Data:
    """What every backend's sections share: the template streams and the COPY file."""

    template: str  # scale.positions positions from scale.devices devices
    memory_template: str  # one position each from scale.memory_devices devices
    copy_file: Path
    rows: int


def prepare_data(bench: Bench, scale: Scale) -> Data:
    log(f"generating {scale.positions:,} positions from {scale.devices:,} devices")
    payloads = list(Fleet(scale.devices, seed=SEED).payloads(scale.positions))
    template = bench.key("template")
    publish(bench.redis, template, payloads)
    copy_file = bench.workdir / "positions.copy"
    rows = format_rows(payloads, copy_file)
    bench.workdir.chmod(0o755)  # the server must be able to reach the COPY file
    memory_template = bench.key("memory-template")
    publish(bench.redis, memory_template, list(Fleet(scale.memory_devices, seed=SEED + 1).payloads(
        scale.memory_devices)))
    return Data(template, memory_template, copy_file, rows)


def run_backend(bench: Bench, data: Data, scale: Scale, only: set[str] | None,
                profile_dir: Path | None) -> dict[str, Any]:
    """Every section on ``bench``'s backend, each in its own fresh database."""
    results: dict[str, Any] = {}
    steps = [("ceiling", lambda: run_ceiling(bench, data.copy_file, data.rows)),
             ("catch_up", lambda: run_catch_up(bench, data.template, scale)),
             ("baseline", lambda: run_baseline(bench, data.template, scale)),
             ("latency", lambda: run_latency(bench, scale)),
             ("memory", lambda: run_memory(bench, data.memory_template, scale)),
             ("scale_out", lambda: run_scale_out(bench, data.template, scale))]
    if profile_dir is not None:
        steps.append(("profile", lambda: run_catch_up(bench, data.template, scale,
                                                      profile=profile_dir / f"{bench.backend}.txt")))
    for name, step in steps:
        if only and name not in only and name != "profile":
            continue
        log(f"{bench.backend}: {name} ...")
        t0 = time.perf_counter()
        results[name] = step()
        log(f"{bench.backend}: {name}: done in {time.perf_counter() - t0:.1f} s: {_brief(results[name])}")
    return results


def server_info(admin_url: str) -> dict[str, Any]:
    conn = psycopg2.connect(admin_url)
    try:
        with conn.cursor() as cur:
            cur.execute("SHOW server_version")
            version = cur.fetchone()[0]
            cur.execute("SELECT default_version FROM pg_available_extensions WHERE name = 'timescaledb'")
            row = cur.fetchone()
    finally:
        conn.close()
    return {"postgresql": version, "timescaledb_available": row[0] if row else None}


def compile_product() -> None:
    """The package's bytecode, written beforehand: a deployment has it (the image compiles it when it
    is built, and Python writes it at a checkout's first start), so no contender pays for compiling
    at each start; where PYTHONDONTWRITEBYTECODE is set (this sandbox, the image) Python would
    compile the whole package again at every start, 0.08 s of each catch-up here (docs/performance.md)."""
    if not compileall.compile_dir(str(ROOT / "processor"), quiet=1):
        raise SystemExit("could not compile the processor package")


def run(scale: Scale, redis_url: str, admin_url: str, only: set[str] | None = None,
        backends: Sequence[str] = BACKENDS, timescaledb_url: str | None = None,
        profile_dir: Path | None = None) -> dict[str, Any]:
    started = time.perf_counter()
    load_before = _load_average()
    compile_product()
    with bench_servers(redis_url, admin_url) as plain:
        results: dict[str, Any] = {"machine": machine(plain), "scale": asdict(scale), "quick": scale is QUICK,
                                   "backends": {}}
        data = prepare_data(plain, scale)
        results["payload_bytes_mean"] = round(data.copy_file.stat().st_size / max(data.rows, 1), 1)
        for backend in backends:
            if backend == "plain":
                section = {"server": {"server": "POSTGRES_URL", **server_info(admin_url)}}
                section.update(run_backend(plain, data, scale, only, profile_dir))
            else:
                why = timescaledb_missing(timescaledb_url)
                if why is not None:
                    log(f"timescaledb: skipped ({why})")
                    results["backends"][backend] = {"skipped": why}
                    continue
                with timescaledb_server(admin_url, timescaledb_url) as (url, described):
                    with bench_servers(redis_url, url, backend=backend, workdir=plain.workdir) as bench:
                        section = {"server": {**described, **server_info(url),
                                              "timescaledb": _extension_version(bench)}}
                        section.update(run_backend(bench, data, scale, only, profile_dir))
            results["backends"][backend] = section
    if not only or "gateway" in only:  # the gateway reads the stream: one run, whatever the table's kind
        log("gateway ...")
        results["gateway"] = gateway_bench.section(redis_url, admin_url, scale is QUICK)
    results["load_average"] = {"before": load_before, "after": _load_average()}
    results["total_seconds"] = round(time.perf_counter() - started, 1)
    return results


def _extension_version(bench: Bench) -> str | None:
    url = bench.fresh_database("version")
    try:
        conn = psycopg2.connect(url)
        try:
            with conn.cursor() as cur:
                cur.execute("SELECT extversion FROM pg_extension WHERE extname = 'timescaledb'")
                row = cur.fetchone()
        finally:
            conn.close()
    finally:
        bench.drop_database(url)
    return row[0] if row else None


def _load_average() -> str | None:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return None


def _brief(result: Any) -> str:
    if isinstance(result, dict):
        keys = ("per_s", "db_p99_ms", "metric_p99_ms", "peak_rss_mb")
        return ", ".join(f"{k}={result[k]}" for k in keys if k in result)
    if isinstance(result, list):
        return ", ".join(_brief(r) for r in result)
    return ""


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="The side-by-side benchmark (issues 6, 12, 13).")
    parser.add_argument("--quick", action="store_true", help="2,000 positions, 2 s of latency: the CI smoke run")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results.json"), help="where the JSON goes")
    parser.add_argument("--redis-url", default=os.environ.get("REDIS_URL", DEFAULT_REDIS_URL))
    parser.add_argument("--postgres-url", default=os.environ.get("POSTGRES_URL", DEFAULT_POSTGRES_URL),
                        help="a maintenance database of a server where CREATE DATABASE is allowed")
    parser.add_argument("--backends", default=",".join(BACKENDS),
                        help="comma-separated: plain (POSTGRES_URL), timescaledb (a hypertable)")
    parser.add_argument("--timescaledb-url", default=os.environ.get("TIMESCALEDB_URL", ""),
                        help="a maintenance database of a server with timescaledb preloaded "
                             "(default: a throwaway one started here)")
    parser.add_argument("--only", default="", help="comma-separated sections (for profiling; no table)")
    parser.add_argument("--py-spy", default="", metavar="DIR",
                        help="after the timed sections, one more catch-up per backend under py-spy into DIR")
    args = parser.parse_args(argv)
    only = {s for s in args.only.split(",") if s}
    backends = [b for b in args.backends.split(",") if b]
    unknown = set(backends) - set(BACKENDS)
    if unknown:
        parser.error(f"unknown backends: {', '.join(sorted(unknown))} (known: {', '.join(BACKENDS)})")
    results = run(QUICK if args.quick else FULL, args.redis_url, args.postgres_url, only or None, backends,
                  args.timescaledb_url or None, Path(args.py_spy) if args.py_spy else None)
    if not only:
        for section in results["backends"].values():
            if "skipped" not in section:
                summarise(section)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    if not only:
        print(table(results))
    log(f"results written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
