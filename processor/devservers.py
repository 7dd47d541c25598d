"""Throwaway local PostgreSQL and Redis servers, for the tests and for ``make run``.

Each server lives in its own temporary directory, on a free port of 127.0.0.1,
and is gone (processes and files) after :meth:`cleanup` or at interpreter exit.
``stop()`` then ``start()`` brings a server back on the same port with the same
data, so tests can take a server away from the processor and give it back.

As a program (``python -m processor.devservers [--demo] -- CMD...``) it checks
that something answers on ``REDIS_URL`` and ``POSTGRES_URL``; for each one that
does not, it starts a throwaway server if the binaries are installed, says so
in one line, runs CMD with the URL exported, and removes the servers when CMD exits.
Only for a URL the user did not set (in the environment or ``.env``), or with
``--demo``: a mistyped URL of one's own must not be covered up by a server that
looks healthy. CMD then gets that URL as it is, and reports why it cannot connect.
"""

from __future__ import annotations

import argparse
import atexit
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Self
from urllib.parse import quote, urlsplit

START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 30.0
# A free port can be taken between finding it and the server binding it: try a few.
PORT_ATTEMPTS = 5
LOG_TAIL_LINES = 20
PROBE_TIMEOUT_S = 1.0

PG_STOP_SIGNALS = {"smart": signal.SIGTERM, "fast": signal.SIGINT, "immediate": signal.SIGQUIT}

# Ports handed to live servers in this process: a stopped server keeps its port,
# so free_port() must not give it to another server in the meantime.
_reserved_ports: set[int] = set()
# Servers not yet cleaned up; atexit removes whatever a crashed test left behind.
_live: set[_ThrowawayServer] = set()
_lock = threading.Lock()


def free_port() -> int:
    """A TCP port of 127.0.0.1 that nothing listens on now (and no live throwaway owns)."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", 0))
            port = int(sock.getsockname()[1])
        with _lock:
            if port not in _reserved_ports:
                _reserved_ports.add(port)
                return port


def postgres_bindir() -> Path | None:
    """The directory holding ``initdb`` and ``postgres``, or None if PostgreSQL is not installed."""
    candidates: list[Path] = []
    if os.environ.get("PG_BINDIR"):
        candidates.append(Path(os.environ["PG_BINDIR"]))
    pg_config = shutil.which("pg_config")
    if pg_config:
        try:
            out = subprocess.run([pg_config, "--bindir"], check=False, capture_output=True, text=True,
                                 timeout=10)
            candidates.append(Path(out.stdout.strip()))
        except (OSError, subprocess.TimeoutExpired):
            pass
    versions = sorted(Path("/usr/lib/postgresql").glob("*/bin"),
                      key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0, reverse=True)
    candidates.extend(versions)
    candidates.append(Path("/usr/local/pgsql/bin"))
    initdb = shutil.which("initdb")
    if initdb:
        candidates.append(Path(initdb).parent)
    for directory in candidates:
        if (directory / "initdb").is_file() and (directory / "postgres").is_file():
            return directory
    return None


# A server that preloads TimescaleDB, as production runs it (CONTRACT 2). Telemetry off: these
# servers are offline and throwaway. No background workers: the per-database job scheduler keeps a
# session open in every database with the extension, and CREATE DATABASE ... TEMPLATE refuses a
# template that has one; the processor uses no TimescaleDB job (policies, compression).
TIMESCALEDB_SETTINGS: Mapping[str, str] = {
    "shared_preload_libraries": "'timescaledb'",
    "timescaledb.telemetry_level": "off",
    "timescaledb.max_background_workers": "0",
}


def timescaledb_installed(bindir: Path | None = None) -> bool:
    """True when the TimescaleDB library sits beside the PostgreSQL server of ``bindir``
    (default :func:`postgres_bindir`), so a throwaway server can preload it."""
    bindir = bindir or postgres_bindir()
    if bindir is None:
        return False
    # Debian: /usr/lib/postgresql/15/{bin,lib}; a source build: /usr/local/pgsql/{bin,lib}.
    libdirs = [bindir.parent / "lib", bindir.parent / "lib" / "postgresql"]
    return any((d / "timescaledb.so").is_file() for d in libdirs)


def redis_server_binary() -> str | None:
    """The path of ``redis-server``, or None if Redis is not installed."""
    return shutil.which("redis-server")


def _tail(path: Path, offset: int = 0, lines: int = LOG_TAIL_LINES) -> str:
    try:
        with open(path, "rb") as fh:
            fh.seek(offset)
            text = fh.read().decode("utf-8", "replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def _is_root() -> bool:
    return os.geteuid() == 0


def _as_postgres() -> dict[str, Any]:
    """Popen arguments that run a command as the ``postgres`` user: PostgreSQL refuses root."""
    if not _is_root():
        return {}
    return {"user": "postgres", "group": "postgres", "extra_groups": []}


def _chown_postgres(*paths: Path) -> None:
    if _is_root():
        for path in paths:
            shutil.chown(path, "postgres", "postgres")


@dataclass(frozen=True)
class Certificates:
    """A private CA and a server certificate it signed, for CN/SAN 127.0.0.1 and localhost."""

    ca_file: Path
    cert_file: Path
    key_file: Path


def _openssl(*args: str, cwd: Path) -> None:
    result = subprocess.run(["openssl", *args], check=False, cwd=cwd, capture_output=True, text=True,
                            timeout=60)
    if result.returncode != 0:
        raise RuntimeError(f"openssl {args[0]} failed: {result.stderr.strip()}")


def make_certificates(directory: Path) -> Certificates:
    """Create a CA and a server certificate in ``directory`` with the ``openssl`` CLI.

    EC keys: generating them takes milliseconds, RSA keys take a good part of a second.
    """
    if not shutil.which("openssl"):
        raise RuntimeError("TLS needs the openssl command line tool, which is not installed")
    directory.mkdir(parents=True, exist_ok=True)
    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    _openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.crt", "-days", "7",
             "-subj", "/CN=throwaway test CA",
             "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=directory)
    _openssl("req", *ec, "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=127.0.0.1",
             cwd=directory)
    (directory / "server.ext").write_text(
        "basicConstraints=CA:FALSE\n"
        "keyUsage=critical,digitalSignature,keyEncipherment\n"
        "extendedKeyUsage=serverAuth\n"
        "subjectAltName=IP:127.0.0.1,DNS:localhost\n"
        "subjectKeyIdentifier=hash\n"
        "authorityKeyIdentifier=keyid\n")
    _openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
             "-out", "server.crt", "-days", "7", "-extfile", "server.ext", cwd=directory)
    key = directory / "server.key"
    key.chmod(0o600)
    return Certificates(directory / "ca.crt", directory / "server.crt", key)


class _PortTaken(Exception):
    """The server exited because its port was taken between free_port() and the bind."""


class _ThrowawayServer:
    """What both servers share: the directory, the port, the process, the wait for readiness."""

    kind = "server"

    def __init__(self, *, base_dir: str | None) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix=f"throwaway-{self.kind.lower()}-", dir=base_dir))
        # The PostgreSQL server runs as another user and must reach its files inside.
        self.dir.chmod(0o755)
        self.log_file = self.dir / f"{self.kind.lower()}.log"
        self.port = free_port()
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_offset = 0
        self._started_once = False
        self._cleaned = False
        with _lock:
            _live.add(self)

    # --- what each server defines ---

    @property
    def url(self) -> str:
        raise NotImplementedError

    def _prepare(self) -> None:
        """One-time set-up before the first start (data directory, certificates)."""

    def _launch(self, log: IO[bytes]) -> subprocess.Popen[bytes]:
        raise NotImplementedError

    def _ping(self) -> bool:
        """True when the server accepts connections; False (or an exception) while not yet."""
        raise NotImplementedError

    # --- lifecycle ---

    def start(self) -> None:
        """Start the server and wait until it accepts connections (raises with its log tail if not)."""
        if self._cleaned:
            raise RuntimeError(f"throwaway {self.kind} was cleaned up; make a new one")
        if self.is_running():
            return
        if not self._started_once:
            self._prepare()
        # Once started, the port is part of the server's identity: a restart must not move it.
        attempts = 1 if self._started_once else PORT_ATTEMPTS
        for attempt in range(attempts):
            try:
                self._start_once()
                self._started_once = True
                return
            except _PortTaken:
                if attempt + 1 == attempts:
                    raise RuntimeError(f"throwaway {self.kind}: port {self.port} is taken") from None
                self._change_port()

    def _change_port(self) -> None:
        old = self.port
        self.port = free_port()
        with _lock:
            _reserved_ports.discard(old)

    def _start_once(self) -> None:
        self._log_offset = self.log_file.stat().st_size if self.log_file.exists() else 0
        with open(self.log_file, "ab") as log:
            self._proc = self._launch(log)
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                tail = _tail(self.log_file, self._log_offset)
                self._proc = None
                if "already in use" in tail:
                    raise _PortTaken
                raise RuntimeError(f"throwaway {self.kind} exited at start; its log says:\n{tail}")
            if self._answers():
                return
            time.sleep(0.05)
        tail = _tail(self.log_file, self._log_offset)
        self.kill()
        raise RuntimeError(f"throwaway {self.kind} did not accept connections within "
                           f"{START_TIMEOUT_S:.0f}s; its log says:\n{tail}")

    def _answers(self) -> bool:
        try:
            return self._ping()
        except Exception:  # noqa: BLE001 - anything but an answer means "not yet"
            return False

    def is_running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def restart(self) -> None:
        self.stop()
        self.start()

    def kill(self) -> None:
        """SIGKILL the server: no shutdown of any kind, as in a crash."""
        proc = self._proc
        if proc is None:
            return
        victims: list[int] = []
        if proc.poll() is None:
            # PostgreSQL's children each call setsid(), so killing the server's process group
            # misses them: a backend lives on until it notices its postmaster died, and a held
            # connection can still get an answer. Freeze the server first (it cannot fork a
            # new child while stopped), then kill it and every descendant it has.
            try:
                os.killpg(proc.pid, signal.SIGSTOP)
                victims = _descendants(proc.pid)
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            for pid in victims:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        proc.wait()
        _wait_gone(proc.pid, victims)
        self._proc = None

    def _stop_with(self, sig: int) -> None:
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(sig)
            try:
                proc.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.kill()
                return
        self._proc = None

    def cleanup(self) -> None:
        """Stop the server (killing it if it will not stop) and remove its directory."""
        if self._cleaned:
            return
        try:
            self.stop()
        except Exception:  # noqa: BLE001 - the files must go whatever happened
            self.kill()
        finally:
            self.kill()
            shutil.rmtree(self.dir, ignore_errors=True)
            self._cleaned = True
            with _lock:
                _reserved_ports.discard(self.port)
                _live.discard(self)

    def stop(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        try:
            self.start()
        except BaseException:
            self.cleanup()
            raise
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.cleanup()

    def __repr__(self) -> str:
        state = "running" if self.is_running() else "stopped"
        return f"<Throwaway{self.kind} {self.url} {state} in {self.dir}>"


def _processes() -> list[tuple[int, int, int]]:
    """(pid, parent pid, process group) of every live process; zombies are left out: they hold nothing."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as fh:
                stat = fh.read().decode("ascii", "replace")
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2:].split()
        if len(fields) > 2 and fields[0] != "Z":
            found.append((int(entry), int(fields[1]), int(fields[2])))
    return found


def _descendants(pid: int) -> list[int]:
    """Every live process below ``pid`` (children, their children, ...)."""
    if not os.path.isdir("/proc"):
        return []
    children: dict[int, list[int]] = {}
    for child, parent, _ in _processes():
        children.setdefault(parent, []).append(child)
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _wait_gone(pgid: int, pids: list[int], timeout: float = 10.0) -> None:
    """Wait until the killed server's group and its descendants are gone: a new PostgreSQL
    refuses to start while old backends still hold the shared memory."""
    if not os.path.isdir("/proc"):
        time.sleep(0.2)
        return
    wanted = set(pids)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not any(pid in wanted or group == pgid for pid, _, group in _processes()):
            return
        time.sleep(0.02)


class ThrowawayPostgres(_ThrowawayServer):
    """A PostgreSQL cluster made with ``initdb`` in a temporary directory.

    Trust authentication, unless ``password`` is given: then host connections need it
    (scram-sha-256). ``ssl=True`` serves TLS with a certificate of a private CA
    (:attr:`ca_file`) and the URL asks for ``sslmode=require``. ``settings`` are extra
    ``postgresql.conf`` lines (name -> value, quoted as needed by the caller).
    """

    kind = "Postgres"

    def __init__(self, *, password: str | None = None, ssl: bool = False, base_dir: str | None = None,
                 settings: Mapping[str, str] | None = None) -> None:
        self.bindir = postgres_bindir()
        if self.bindir is None:
            raise RuntimeError("PostgreSQL server binaries (initdb, postgres) are not installed")
        super().__init__(base_dir=base_dir)
        self.password = password
        self.ssl = ssl
        self.settings = dict(settings or {})
        self.data_dir = self.dir / "data"
        self.socket_dir = self.dir / "run"
        self.ca_file: Path | None = None
        self.cert_file: Path | None = None
        self.key_file: Path | None = None

    @property
    def preloads_timescaledb(self) -> bool:
        return "timescaledb" in self.settings.get("shared_preload_libraries", "")

    @property
    def url(self) -> str:
        auth = "postgres" + (f":{quote(self.password, safe='')}" if self.password else "")
        query = "?sslmode=require" if self.ssl else ""
        return f"postgresql://{auth}@127.0.0.1:{self.port}/postgres{query}"

    def _prepare(self) -> None:
        self.data_dir.mkdir(mode=0o700)
        self.socket_dir.mkdir()
        _chown_postgres(self.data_dir, self.socket_dir)
        self._initdb()
        conf = {
            "listen_addresses": "'127.0.0.1'",
            "unix_socket_directories": f"'{self.socket_dir}'",
            # Throwaway data: a killed server keeps what it wrote (the kernel has it),
            # only a machine crash could lose it. synchronous_commit stays on, so a
            # committed row survives SIGKILL of the server.
            "fsync": "off",
            "full_page_writes": "off",
            "shared_buffers": "16MB",
            "max_connections": "64",
            "log_min_messages": "warning",
        }
        if self.ssl:
            certs = make_certificates(self.dir / "tls")
            _chown_postgres(certs.cert_file, certs.key_file)
            self.ca_file, self.cert_file, self.key_file = certs.ca_file, certs.cert_file, certs.key_file
            conf.update({"ssl": "on", "ssl_cert_file": f"'{certs.cert_file}'",
                         "ssl_key_file": f"'{certs.key_file}'"})
        conf.update(self.settings)
        with open(self.data_dir / "postgresql.conf", "a", encoding="utf-8") as fh:
            fh.write("\n# throwaway server settings\n")
            fh.writelines(f"{name} = {value}\n" for name, value in conf.items())

    def _initdb(self) -> None:
        assert self.bindir is not None
        args = [str(self.bindir / "initdb"), "-D", str(self.data_dir), "-U", "postgres",
                "--encoding=UTF8", "--locale=C", "--no-sync", "--no-instructions"]
        pwfile = self.dir / "pwfile"
        if self.password:
            pwfile.write_text(self.password + "\n", encoding="utf-8")
            pwfile.chmod(0o600)
            _chown_postgres(pwfile)
            args += ["--auth-local=trust", "--auth-host=scram-sha-256", f"--pwfile={pwfile}"]
        else:
            args += ["--auth=trust"]
        try:
            result = subprocess.run(args, check=False, cwd=self.dir, capture_output=True, text=True,
                                    timeout=120, **_as_postgres())
        finally:
            pwfile.unlink(missing_ok=True)
        if result.returncode != 0:
            raise RuntimeError(f"initdb failed: {(result.stderr or result.stdout).strip()}")

    def _launch(self, log: IO[bytes]) -> subprocess.Popen[bytes]:
        # The postgres binary itself, not pg_ctl: we stay its parent, so it is reaped
        # when it exits and kill() hits the real server (pg_ctl would daemonize it).
        assert self.bindir is not None
        return subprocess.Popen(
            [str(self.bindir / "postgres"), "-D", str(self.data_dir), "-p", str(self.port)],
            cwd=self.dir, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True, **_as_postgres())

    def _ping(self) -> bool:
        import psycopg2

        psycopg2.connect(self.url, connect_timeout=2).close()
        return True

    def stop(self, mode: str = "fast") -> None:
        """Shut down as ``pg_ctl stop -m mode`` would: smart, fast or immediate."""
        if mode not in PG_STOP_SIGNALS:
            raise ValueError(f"mode must be one of {', '.join(PG_STOP_SIGNALS)}, got {mode!r}")
        self._stop_with(PG_STOP_SIGNALS[mode])


class ThrowawayRedis(_ThrowawayServer):
    """A ``redis-server`` in a temporary directory.

    No persistence unless ``appendonly`` (then every write is fsynced, so a restart or
    a kill keeps the streams and groups). ``password`` sets ``requirepass``; ``tls``
    serves TLS only, with a certificate of a private CA (:attr:`ca_file`).
    """

    kind = "Redis"

    def __init__(self, *, password: str | None = None, tls: bool = False, appendonly: bool = False,
                 base_dir: str | None = None) -> None:
        binary = redis_server_binary()
        if binary is None:
            raise RuntimeError("redis-server is not installed")
        self.binary = binary
        super().__init__(base_dir=base_dir)
        self.password = password
        self.tls = tls
        self.appendonly = appendonly
        self.ca_file: Path | None = None
        self.cert_file: Path | None = None
        self.key_file: Path | None = None

    @property
    def url(self) -> str:
        auth = f":{quote(self.password, safe='')}@" if self.password else ""
        if not self.tls:
            return f"redis://{auth}127.0.0.1:{self.port}/0"
        # redis-py passes unknown query options to the connection class as strings:
        # ssl_cert_reqs accepts none/optional/required, ssl_ca_certs a file path.
        ca = quote(str(self.ca_file), safe="/")
        return f"rediss://{auth}127.0.0.1:{self.port}/0?ssl_cert_reqs=required&ssl_ca_certs={ca}"

    def _prepare(self) -> None:
        if self.tls:
            certs = make_certificates(self.dir / "tls")
            self.ca_file, self.cert_file, self.key_file = certs.ca_file, certs.cert_file, certs.key_file

    def _config(self) -> str:
        lines = [
            "bind 127.0.0.1",
            "protected-mode no",
            "daemonize no",
            f"dir {_quote_conf(str(self.dir))}",
            'logfile ""',
            # Without appendonly nothing survives a restart: no snapshot at shutdown either.
            'save ""',
            f"appendonly {'yes' if self.appendonly else 'no'}",
            "appendfsync always",
        ]
        if self.tls:
            assert self.cert_file and self.key_file and self.ca_file
            lines += ["port 0", f"tls-port {self.port}",
                      f"tls-cert-file {_quote_conf(str(self.cert_file))}",
                      f"tls-key-file {_quote_conf(str(self.key_file))}",
                      f"tls-ca-cert-file {_quote_conf(str(self.ca_file))}",
                      "tls-auth-clients no"]
        else:
            lines.append(f"port {self.port}")
        if self.password:
            lines.append(f"requirepass {_quote_conf(self.password)}")
        return "\n".join(lines) + "\n"

    def _launch(self, log: IO[bytes]) -> subprocess.Popen[bytes]:
        conf = self.dir / "redis.conf"
        conf.write_text(self._config(), encoding="utf-8")
        conf.chmod(0o600)
        return subprocess.Popen([self.binary, str(conf)], cwd=self.dir, stdin=subprocess.DEVNULL,
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def client(self, **kwargs: Any) -> Any:
        """A redis-py client for this server (the caller closes it)."""
        import redis

        return redis.Redis.from_url(self.url, **kwargs)

    def _ping(self) -> bool:
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        # redis-py retries a refused connection with backoff by default: we poll ourselves.
        client = self.client(socket_connect_timeout=1, socket_timeout=2, retry=Retry(NoBackoff(), 0))
        try:
            return bool(client.ping())  # raises BusyLoadingError while the AOF loads
        finally:
            client.close()

    def stop(self, mode: str = "fast") -> None:
        """SIGTERM: Redis flushes the append-only file (if any) and exits. ``mode`` is ignored."""
        self._stop_with(signal.SIGTERM)


def _quote_conf(value: str) -> str:
    """A redis.conf argument in double quotes, so spaces and quotes survive."""
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


@atexit.register
def _cleanup_all() -> None:
    for server in list(_live):
        server.cleanup()


# --------------------------------------------------------------------------- CLI


def _say(line: str) -> None:
    print(f"devservers: {line}", file=sys.stderr, flush=True)


def _connectable(family: int, address: Any) -> bool:
    try:
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.settimeout(PROBE_TIMEOUT_S)
            sock.connect(address)
        return True
    except OSError:
        return False


def _tcp_answers(host: str, port: int) -> bool:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError:
        return False
    return any(_connectable(family, addr) for family, _, _, _, addr in infos)


def redis_answers(url: str) -> bool:
    """True when something accepts connections where ``url`` points (no auth is tried)."""
    parts = urlsplit(url)
    if parts.scheme == "unix":
        return _connectable(socket.AF_UNIX, parts.path)
    return _tcp_answers(parts.hostname or "localhost", parts.port or 6379)


def postgres_answers(url: str) -> bool:
    """True when something accepts connections where ``url`` points (no auth is tried)."""
    from psycopg2.extensions import parse_dsn

    try:
        dsn = parse_dsn(url)
    except Exception:  # noqa: BLE001 - the service will report the bad URL itself
        return True
    host = (dsn.get("host") or "/var/run/postgresql").split(",")[0]
    port = int((dsn.get("port") or "5432").split(",")[0])
    if host.startswith("/"):
        return _connectable(socket.AF_UNIX, f"{host}/.s.PGSQL.{port}")
    return _tcp_answers(host, port)


def set_by_user(name: str, environ: Mapping[str, str], dotenv_path: str = ".env") -> str | None:
    """Where the user set ``name`` ("the environment" or ".env"), or None when the default applies.
    An empty value is no value, as for the service's configuration."""
    if environ.get(name):
        return "the environment"
    if os.path.isfile(dotenv_path):
        from dotenv import dotenv_values

        if dotenv_values(dotenv_path).get(name):
            return dotenv_path
    return None


def _ensure(what: str, url: str, answers: bool, installed: bool, make: Any,
            servers: list[_ThrowawayServer], chosen_in: str | None = None) -> str | None:
    """The URL to use for one service, starting a throwaway server if needed (None: no way).

    ``chosen_in``: where the user set this URL; such a URL is used as it is, answering or not.
    """
    from .core.redact import redact

    if answers:
        return url
    if chosen_in is not None:
        _say(f"nothing answers on {redact(url)}, the URL set in {chosen_in}; starting no throwaway "
             f"{what} in its place (unset it, or use make demo, to get one)")
        return url
    if not installed:
        _say(f"nothing answers on {redact(url)} and no {what} server is installed; "
             f"start {what} or set the URL in the environment or .env")
        return None
    server = make()
    servers.append(server)
    server.start()
    _say(f"nothing answers on {redact(url)}; started a throwaway {what} on {server.url}")
    return str(server.url)


def _simulator_command() -> list[str]:
    script = Path(__file__).resolve().parent.parent / "processor.py"
    base = [sys.executable, str(script)] if script.is_file() else \
        [sys.executable, "-c", "import sys; from processor.cli import main; sys.exit(main())"]
    return base + ["simulate", "--devices", "20", "--rate", "20"]


def _demo_gateway(env: Mapping[str, str]) -> tuple[list[str], dict[str, str], str]:
    """The demo's live gateway: its command, its environment and the page's URL (with a token when
    GATEWAY_TOKEN_SECRET is set; else the demo's gateway is public)."""
    env = dict(env)
    url = f"http://127.0.0.1:{env.get('GATEWAY_PORT') or '8765'}/"
    secret = env.get("GATEWAY_TOKEN_SECRET")
    if secret:
        from .gateway.auth import mint

        url += "#access_token=" + mint(secret, issuer=env.get("GATEWAY_TOKEN_ISSUER") or "directus", ttl_s=86400)
    else:
        env["GATEWAY_PUBLIC"] = "true"
    return _simulator_command()[:-5] + ["gateway"], env, url


def _exit_status(returncode: int) -> int:
    return 128 - returncode if returncode < 0 else returncode


def _supervise(command: Sequence[str], env: dict[str, str], *, demo: bool) -> int:
    """Run ``command`` (and the simulator with --demo), forwarding SIGINT/SIGTERM to them."""
    received: list[int] = []

    def on_signal(signum: int, _frame: Any) -> None:
        received.append(signum)  # only record: forwarding happens in the loop below

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    # Own process groups: a terminal's Ctrl-C reaches us only, and we pass it on once
    # (the service treats a second signal as "exit now").
    children: list[subprocess.Popen[bytes]] = []
    try:
        service = subprocess.Popen(list(command), env=env, process_group=0)
        children.append(service)
        if demo:
            children.append(subprocess.Popen(_simulator_command(), env=env, process_group=0))
            command, gateway_env, url = _demo_gateway(env)
            children.append(subprocess.Popen(command, env=gateway_env, process_group=0))
            _say(f"live map: {url}")
        while True:
            while received:
                signum = received.pop(0)
                for child in children:
                    if child.poll() is None:
                        child.send_signal(signum)
            try:
                returncode = service.wait(timeout=0.2)
                break
            except subprocess.TimeoutExpired:
                continue
        return _exit_status(returncode)
    finally:
        for child in children:
            _stop_child(child)
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _stop_child(child: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    if child.poll() is not None:
        return
    child.send_signal(signal.SIGINT)
    try:
        child.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        child.kill()
        child.wait()


def _parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m processor.devservers",
        description="Run CMD with REDIS_URL/POSTGRES_URL pointing at servers that answer, "
                    "starting throwaway local ones when nothing answers.")
    parser.add_argument("--demo", action="store_true",
                        help="also run the simulator (20 devices, 20 positions/s) and the live gateway "
                             "while CMD runs, and print the live map's URL")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- CMD [ARGS...]")
    args = parser.parse_args(argv)
    if args.command and args.command[0] == "--":
        args.command = args.command[1:]
    if not args.command:
        parser.error("a command to run is required after --")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    from .core.config import load_config
    from .core.errors import ConfigError

    args = _parse_args(sys.argv[1:] if argv is None else argv)
    try:
        config = load_config()
    except ConfigError as exc:
        _say(str(exc))
        return 2
    env = dict(os.environ)
    # --demo always has servers to show; otherwise only a default URL may be replaced.
    def chosen(name: str) -> str | None:
        return None if args.demo else set_by_user(name, env)

    servers: list[_ThrowawayServer] = []
    try:
        redis_url = _ensure("Redis", config.redis_url, redis_answers(config.redis_url),
                            redis_server_binary() is not None, ThrowawayRedis, servers, chosen("REDIS_URL"))
        if redis_url is None:
            return 1
        # Production's database when it is installed here: positions becomes a hypertable.
        tsdb = timescaledb_installed()
        postgres_url = _ensure("PostgreSQL with TimescaleDB" if tsdb else "PostgreSQL", config.postgres_url,
                               postgres_answers(config.postgres_url), postgres_bindir() is not None,
                               lambda: ThrowawayPostgres(settings=TIMESCALEDB_SETTINGS if tsdb else None),
                               servers, chosen("POSTGRES_URL"))
        if postgres_url is None:
            return 1
        # The real environment wins over .env in load_config: exporting is enough.
        env["REDIS_URL"], env["POSTGRES_URL"] = redis_url, postgres_url
        return _supervise(args.command, env, demo=args.demo)
    except RuntimeError as exc:
        _say(str(exc))
        return 1
    finally:
        for server in reversed(servers):
            server.cleanup()


if __name__ == "__main__":
    sys.exit(main())
