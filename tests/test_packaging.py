"""Packaging and operations artifacts: Dockerfile, compose, CI workflow, systemd, cron, env file, build.

Static files are parsed and checked for what the service depends on; where a
file holds something executable (the health checks, the cron command, the
dependency one-liner of the Dockerfile, the systemd unit) it is run or verified
for real. The wheel is built, installed into a fresh venv and run against a real
database (marked slow).
"""

from __future__ import annotations

import fcntl
import fnmatch
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tarfile
import threading
import tomllib
import venv
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Self
from urllib.parse import urlsplit

import psycopg2
import pytest
import yaml

from processor import __version__
from processor.core.config import _SPEC, VARIABLES, Config, load_config

ROOT = Path(__file__).resolve().parent.parent
DEFAULTS = Config()


# --- helpers -------------------------------------------------------------------------------------

def run(args: list[str], *, timeout: float, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    """Run a command to completion; the caller asserts on its status and output."""
    return subprocess.run(args, check=False, capture_output=True, text=True, timeout=timeout, **kwargs)


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(KEYWORD, arguments) per instruction, continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    buf = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            buf += line[:-1].strip() + " "
            continue
        keyword, _, rest = (buf + line).partition(" ")
        out.append((keyword.upper(), rest.strip()))
        buf = ""
    return out


def instruction(instructions: list[tuple[str, str]], keyword: str) -> list[str]:
    return [args for kw, args in instructions if kw == keyword]


def healthcheck_exec(args: str) -> list[str]:
    """The exec-form command of a HEALTHCHECK instruction (options stripped)."""
    assert " CMD " in f" {args}", f"HEALTHCHECK without CMD: {args!r}"
    command = json.loads(args.split("CMD", 1)[1].strip())
    assert isinstance(command, list), "HEALTHCHECK must use the exec form (a JSON array)"
    return command


def duration_s(value: str) -> float:
    """A compose duration ('30s', '1m30s', '500ms') in seconds."""
    units = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001, "us": 1e-6}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|us|h|m|s)", value)
    assert parts and "".join(n + u for n, u in parts) == value, f"not a duration: {value!r}"
    return sum(float(n) * units[u] for n, u in parts)


def unit_directives(text: str) -> dict[str, list[tuple[str, str]]]:
    """systemd unit sections -> [(key, value)], keys may repeat."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current = None
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = line.strip("[]")
            sections.setdefault(current, [])
            continue
        key, _, value = line.partition("=")
        assert current is not None, f"directive outside a section: {line!r}"
        sections[current].append((key.strip(), value.strip()))
    return sections


def one(directives: list[tuple[str, str]], key: str) -> str:
    values = [v for k, v in directives if k == key]
    assert len(values) == 1, f"{key}: expected once, found {values}"
    return values[0]


class _HealthServer:
    """A tiny HTTP server answering ``status`` on /healthz and 404 elsewhere."""

    def __init__(self) -> None:
        self.status = 200
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                code = owner.status if self.path == "/healthz" else 404
                self.send_response(code)
                self.end_headers()
                self.wfile.write(b"ok" if code == 200 else b"no")

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> Self:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


def run_healthcheck(command: list[str], port: int) -> int:
    assert command[0] == "python", command
    env = {"PATH": os.environ.get("PATH", ""), "METRICS_PORT": str(port)}
    return run([sys.executable, *command[1:]], env=env, timeout=30).returncode


def assert_healthcheck_behaves(command: list[str]) -> None:
    """Exit 0 on a 200 from /healthz; non-zero on 503, on a refused connection."""
    assert not {"curl", "wget"} & {Path(part).name for part in command}
    assert not re.search(r"\b(curl|wget)\b", " ".join(command))
    with _HealthServer() as server:
        assert run_healthcheck(command, server.port) == 0
        server.status = 503
        assert run_healthcheck(command, server.port) != 0
        closed_port = server.port
    assert run_healthcheck(command, closed_port) != 0


# --- Dockerfile ----------------------------------------------------------------------------------

def _stages() -> list[list[tuple[str, str]]]:
    stages: list[list[tuple[str, str]]] = []
    for kw, args in dockerfile_instructions((ROOT / "Dockerfile").read_text()):
        if kw == "FROM":
            stages.append([])
        stages[-1].append((kw, args))
    return stages


@pytest.fixture(scope="module")
def dockerfile() -> list[tuple[str, str]]:
    """The image's own stage (the last): what runs."""
    return _stages()[-1]


def test_dockerfile_builds_the_compiled_way_in_a_stage_of_its_own() -> None:
    stages = _stages()
    assert len(stages) == 2
    build, image = stages
    assert instruction(build, "FROM") == ["python:3.11-slim AS build"]
    runs = " ".join(instruction(build, "RUN"))
    assert "gcc" in runs and "pip wheel" in runs and "import processor.core._speedups" in runs
    # the image takes the wheel and the extension from it, and no compiler (tests/test_image.py looks inside)
    copies = instruction(image, "COPY")
    assert "--from=build /wheels /tmp/wheels" in copies
    assert "--from=build /built/processor/core/_speedups.*.so processor/core/" in copies
    assert "gcc" not in " ".join(instruction(image, "RUN"))


def test_dockerfile_base_workdir_user_and_runtime(dockerfile: list[tuple[str, str]]) -> None:
    assert instruction(dockerfile, "FROM") == ["python:3.11-slim"]
    assert instruction(dockerfile, "WORKDIR") == ["/app"]
    users = instruction(dockerfile, "USER")
    assert users, "the image must drop root"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0"), users
    assert json.loads(instruction(dockerfile, "CMD")[-1]) == ["python", "processor.py"]
    assert instruction(dockerfile, "STOPSIGNAL") == ["SIGTERM"]
    assert instruction(dockerfile, "EXPOSE") == [str(DEFAULTS.metrics_port)]
    # USER comes after every install step: nothing runs as root at run time, the code stays root-owned.
    keywords = [kw for kw, _ in dockerfile]
    assert keywords.index("USER") > max(i for i, kw in enumerate(keywords) if kw == "RUN")


def test_dockerfile_installs_dependencies_before_the_source(dockerfile: list[tuple[str, str]]) -> None:
    steps = [(kw, args) for kw, args in dockerfile if kw in ("COPY", "RUN")]
    copies = [args for kw, args in steps if kw == "COPY"]
    assert copies[0] == "pyproject.toml ./", "only pyproject.toml before the dependency layer"
    assert [c for c in copies[1:] if not c.startswith("--from=build ")] == [". ."], "then the source, once"
    deps_at = next(i for i, (kw, args) in enumerate(steps) if kw == "RUN" and "pip install -r" in args)
    source_at = next(i for i, (kw, args) in enumerate(steps) if kw == "COPY" and args.split()[0] == ".")
    install_at = next(i for i, (kw, args) in enumerate(steps)
                      if kw == "RUN" and "pip install --no-deps /tmp/wheels/" in args)
    assert 0 < deps_at < source_at < install_at


def test_dockerfile_dependency_list_is_exactly_pyprojects(dockerfile: list[tuple[str, str]]) -> None:
    """Run the Dockerfile's own one-liner: it must print the [project] dependencies, one a line."""
    step = next(args for kw, args in dockerfile if kw == "RUN" and "tomllib" in args)
    code = re.search(r'python -c "([^"]+)"', step).group(1)
    result = run([sys.executable, "-c", code], cwd=ROOT, timeout=30)
    assert result.returncode == 0, result.stderr
    printed = result.stdout.splitlines()
    with open(ROOT / "pyproject.toml", "rb") as f:
        project = tomllib.load(f)["project"]
    # the gateway extra too: the same image runs `gateway` (docker-compose.yml)
    expected = project["dependencies"] + project["optional-dependencies"]["gateway"]
    assert printed == expected
    assert any(line.startswith("psycopg2") for line in printed)


def test_dockerfile_healthcheck_uses_urllib_on_healthz(dockerfile: list[tuple[str, str]]) -> None:
    (args,) = instruction(dockerfile, "HEALTHCHECK")
    command = healthcheck_exec(args)
    assert "/healthz" in command[-1] and "urllib" in command[-1]
    assert_healthcheck_behaves(command)


def _dockerignore_rules() -> list[tuple[bool, str]]:
    rules = []
    for raw in (ROOT / ".dockerignore").read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        rules.append((negate, line.lstrip("!").strip("/")))
    return rules


def _in_context(rel: str, rules: list[tuple[bool, str]]) -> bool:
    """Docker's rule: the last matching pattern wins; a pattern matching a directory covers its files."""
    included = True
    parts = rel.split("/")
    for negate, pattern in rules:
        prefixes = ("/".join(parts[:i]) for i in range(1, len(parts) + 1))
        bare = pattern[3:] if pattern.startswith("**/") else None
        if any(fnmatch.fnmatchcase(p, pattern) or (bare and fnmatch.fnmatchcase(p, bare)) for p in prefixes):
            included = negate
    return included


def test_dockerignore_sends_the_runtime_files_and_nothing_else() -> None:
    rules = _dockerignore_rules()
    tracked = run(["git", "ls-files"], cwd=ROOT, timeout=30).stdout.split()
    assert "processor/cli.py" in tracked
    for needed in ("pyproject.toml", "processor.py", "schema.sql", "processor/__init__.py",
                   "processor/cli.py", "processor/schema.sql", "processor/core/config.py"):
        assert _in_context(needed, rules), needed
    for path in tracked:
        if path.startswith("processor/"):
            assert _in_context(path, rules), path
    for unwanted in (".env", ".git/HEAD", ".venv/bin/python", "venv/bin/python", "tests/conftest.py",
                     "processor/__pycache__/cli.cpython-311.pyc", "processor/core/__pycache__/db.pyc",
                     "bench/results.json", ".pytest_cache/v/cache", "dist/x.whl", "build/lib/x.py",
                     "telemetry_processor.egg-info/PKG-INFO", "docs/x.md", "deploy/replay.cron"):
        assert not _in_context(unwanted, rules), unwanted


def test_root_schema_sql_is_the_package_schema() -> None:
    """The image copies schema.sql as a symlink; it must stay one, relative, onto the packaged file."""
    link = ROOT / "schema.sql"
    assert link.is_symlink()
    assert os.readlink(link) == "processor/schema.sql"
    assert link.read_text() == (ROOT / "processor" / "schema.sql").read_text()
    assert (ROOT / "processor.py").is_file()


# --- docker-compose.yml --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def _container_ports(service: dict) -> set[int]:
    return {int(str(p).rsplit(":", 1)[-1].split("/")[0]) for p in service.get("ports", [])}


def test_compose_databases(compose: dict) -> None:
    services = compose["services"]
    assert set(services) == {"timescaledb", "redis", "processor", "gateway"}
    pg, rd = services["timescaledb"], services["redis"]
    assert pg["image"] == "${TIMESCALEDB_IMAGE:-timescale/timescaledb:latest-pg16}"
    assert pg["environment"]["POSTGRES_PASSWORD"] == "postgres"  # tests/conftest.py connects with it
    assert _container_ports(pg) == {5432}
    assert "pg_isready" in " ".join(pg["healthcheck"]["test"])
    assert rd["image"] == "${REDIS_IMAGE:-redis:7}"
    assert " ".join(rd["command"]).endswith("--appendonly yes")
    assert _container_ports(rd) == {6379}
    assert rd["healthcheck"]["test"] == ["CMD", "redis-cli", "ping"]
    # pytest-docker runs a plain `up`: the databases must not be behind a profile.
    assert "profiles" not in pg and "profiles" not in rd


def _interpolate(value: str, env: dict[str, str]) -> str:
    """Compose's ``${VAR:-default}``: the variable when set and not empty, else the default."""
    return re.sub(r"\$\{(\w+):-([^}]*)\}", lambda m: env.get(m.group(1)) or m.group(2), value)


@pytest.mark.parametrize("env, expected", [
    ({}, ("timescale/timescaledb:latest-pg16", "redis:7")),
    ({"TIMESCALEDB_IMAGE": "", "REDIS_IMAGE": ""}, ("timescale/timescaledb:latest-pg16", "redis:7")),
    ({"TIMESCALEDB_IMAGE": "mirror.internal/timescaledb:2.17-pg16", "REDIS_IMAGE": "localhost/redis:7.2"},
     ("mirror.internal/timescaledb:2.17-pg16", "localhost/redis:7.2")),
], ids=["defaults", "empty", "overridden"])
def test_compose_database_images_can_be_overridden(compose: dict, env: dict[str, str],
                                                    expected: tuple[str, str]) -> None:
    services = compose["services"]
    assert (_interpolate(services["timescaledb"]["image"], env), _interpolate(services["redis"]["image"], env)) \
        == expected
    # Nothing else in the file is left to a variable without a default.
    text = (ROOT / "docker-compose.yml").read_text()
    assert not re.findall(r"\$\{\w+\}", text)
    assert set(re.findall(r"\$\{(\w+):-", text)) == {"TIMESCALEDB_IMAGE", "REDIS_IMAGE", "TP_POSTGRES_PORT",
                                                     "TP_REDIS_PORT", "TP_METRICS_PORT", "TP_GATEWAY_PORT",
                                                     "TP_GATEWAY_SECRET", "TP_GATEWAY_PUBLIC"}


def test_compose_processor(compose: dict) -> None:
    proc = compose["services"]["processor"]
    assert proc["profiles"] == ["app"]
    assert proc["build"] == "."
    assert proc["depends_on"] == {"timescaledb": {"condition": "service_healthy"},
                                  "redis": {"condition": "service_healthy"}}
    env = proc["environment"]
    redis_url, pg_url = urlsplit(env["REDIS_URL"]), urlsplit(env["POSTGRES_URL"])
    assert (redis_url.scheme, redis_url.hostname, redis_url.port) == ("redis", "redis", 6379)
    assert (pg_url.scheme, pg_url.hostname, pg_url.port) == ("postgresql", "timescaledb", 5432)
    assert pg_url.password == compose["services"]["timescaledb"]["environment"]["POSTGRES_PASSWORD"]
    load_config(env, dotenv_path=None)  # every value the service is given must pass its own validation
    assert _container_ports(proc) == {DEFAULTS.metrics_port}
    assert proc["restart"] == "unless-stopped"
    assert duration_s(proc["stop_grace_period"]) > DEFAULTS.shutdown_timeout_s
    assert proc["stop_signal"] == "SIGTERM"


def test_compose_processor_healthcheck_behaves(compose: dict) -> None:
    test = compose["services"]["processor"]["healthcheck"]["test"]
    assert test[0] == "CMD"
    assert "$" not in " ".join(test), "compose would interpolate it"
    assert_healthcheck_behaves(test[1:])


# --- .gitea/workflows/ci.yml ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def workflow() -> dict:
    return yaml.safe_load((ROOT / ".gitea" / "workflows" / "ci.yml").read_text())


def test_workflow_triggers_services_and_environment(workflow: dict) -> None:
    triggers = workflow[True]  # PyYAML reads the key `on` as YAML 1.1's boolean true
    assert {"push", "pull_request"} <= set(triggers)
    (job,) = workflow["jobs"].values()
    assert job["runs-on"] == "ubuntu-latest"
    assert job["container"]["image"].endswith("bookworm"), "bookworm: python 3.11 and postgresql-15 in apt"
    services = job["services"]
    assert services["timescaledb"]["image"] == "timescale/timescaledb:latest-pg16"
    assert services["redis"]["image"] == "redis:7"
    assert "--health-cmd" in services["timescaledb"]["options"]
    assert "pg_isready" in services["timescaledb"]["options"]
    assert "redis-cli ping" in services["redis"]["options"]
    env = job["env"]
    assert env["CI"] == "true"
    redis_url, pg_url = urlsplit(env["TEST_REDIS_URL"]), urlsplit(env["TEST_POSTGRES_URL"])
    assert (redis_url.hostname, redis_url.port) == ("redis", 6379)
    assert (pg_url.hostname, pg_url.port, pg_url.username) == ("timescaledb", 5432, "postgres")
    assert pg_url.password == services["timescaledb"]["env"]["POSTGRES_PASSWORD"]


def test_workflow_steps(workflow: dict) -> None:
    (job,) = workflow["jobs"].values()
    steps = job["steps"]
    runs = [step.get("run", "") for step in steps]
    lines = [[line.strip() for line in run.splitlines()] for run in runs]

    def index(predicate) -> int:
        return next(i for i, step_lines in enumerate(lines) if any(predicate(line) for line in step_lines))

    checkout = next(i for i, step in enumerate(steps)
                    if str(step.get("uses", "")).startswith("actions/checkout@"))
    apt = index(lambda line: "postgresql-15" in line)
    apt_text = runs[apt]
    for package in ("postgresql-15", "redis-server", "prometheus", "python3-venv", "make", "openssl",
                    "systemd"):
        assert re.search(rf"(^|\s){re.escape(package)}(\s|$)", apt_text), package
    install = index(lambda line: line == "make venv" or (".[test]" in line and "pip install" in line))
    test = index(lambda line: line == "make test")
    build = index(lambda line: line.endswith("python -m build"))
    assert apt < install and checkout < install < test < build
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^test:", makefile, re.MULTILINE) and re.search(r"pip install .*'\.\[test\]'", makefile)


def test_workflow_runs_the_readme_test_command() -> None:
    readme = ROOT / "README.md"
    if not readme.exists():
        pytest.skip("README.md is not written yet")
    assert "make test" in readme.read_text()


# --- systemd unit ----------------------------------------------------------------------------------

UNIT = ROOT / "deploy" / "telemetry-processor.service"


def test_unit_directives() -> None:
    from processor.cli import EXIT_CONFIG

    sections = unit_directives(UNIT.read_text())
    service = sections["Service"]
    assert one(service, "Type") in ("simple", "exec")
    assert one(service, "User") == one(service, "Group") == "telemetry"
    assert one(service, "WorkingDirectory") == "/opt/telemetry-processor"
    assert one(service, "EnvironmentFile") == "/etc/telemetry-processor/env"
    assert one(service, "ExecStart") == "/opt/telemetry-processor/.venv/bin/telemetry-processor run"
    assert one(service, "Restart") == "on-failure"
    assert one(service, "RestartSec") == "5"
    assert one(service, "RestartPreventExitStatus") == str(EXIT_CONFIG)
    assert one(service, "KillSignal") == "SIGTERM"
    assert int(one(service, "TimeoutStopSec")) > DEFAULTS.shutdown_timeout_s
    for key in ("NoNewPrivileges", "ProtectHome", "PrivateTmp", "PrivateDevices", "ProtectKernelTunables",
                "ProtectControlGroups", "LockPersonality"):
        assert one(service, key) == "yes", key
    assert one(service, "ProtectSystem") == "strict"
    assert one(service, "RestrictAddressFamilies").split() == ["AF_INET", "AF_INET6", "AF_UNIX"]
    assert one(sections["Install"], "WantedBy") == "multi-user.target"


def _verifiable_unit(tmp_path: Path, extra: str = "") -> Path:
    """The unit with ExecStart pointing at a binary that exists here.

    systemd-analyze verify checks that ExecStart's binary exists and is executable;
    /opt/telemetry-processor is not installed on a test machine. Everything else is
    verified as written (a missing User= or EnvironmentFile= is not reported by verify).
    """
    true = shutil.which("true")
    assert true
    text = UNIT.read_text()
    rewritten = re.sub(r"^ExecStart=\S+", f"ExecStart={true}", text, count=1, flags=re.MULTILINE)
    assert rewritten != text
    path = tmp_path / UNIT.name
    path.write_text(rewritten + extra)
    return path


def _verify(path: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "SYSTEMD_LOG_COLOR": "0", "SYSTEMD_PAGER": ""}
    return run(["systemd-analyze", "verify", str(path)], env=env, timeout=60)


needs_systemd_analyze = pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                                           reason="systemd-analyze is not installed")


@needs_systemd_analyze
def test_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    """Exit 0 and nothing on stderr: verify reports unknown keys and bad values as warnings only."""
    result = _verify(_verifiable_unit(tmp_path))
    assert (result.returncode, result.stderr) == (0, ""), result.stderr
    # The check can fail: the same harness catches a bad value.
    broken = _verify(_verifiable_unit(tmp_path, "\n[Service]\nRestart=sometimes\n"))
    assert "restart specifier" in broken.stderr


@needs_systemd_analyze
def test_unit_sandbox_exposure_is_low(tmp_path: Path) -> None:
    unit = _verifiable_unit(tmp_path)
    result = run(["systemd-analyze", "security", "--offline=yes", "--no-pager", str(unit)],
                 env={**os.environ, "SYSTEMD_LOG_COLOR": "0"}, timeout=60)
    if "--offline" in result.stderr and result.returncode != 0:
        pytest.skip(f"systemd-analyze security --offline is not supported here: {result.stderr.strip()}")
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", result.stdout)
    assert match, result.stdout[-500:] + result.stderr
    assert float(match.group(1)) <= 2.0, result.stdout


# --- systemd template unit: N instances on one host ----------------------------------------------

TEMPLATE = ROOT / "deploy" / "telemetry-processor@.service"
PROGRAM = "/opt/telemetry-processor/.venv/bin/telemetry-processor"


def _template_exec_start() -> list[str]:
    return one(unit_directives(TEMPLATE.read_text())["Service"], "ExecStart").split()


def test_template_unit_is_the_unit_with_a_name_and_a_port_per_instance() -> None:
    single, template = unit_directives(UNIT.read_text()), unit_directives(TEMPLATE.read_text())
    # Only Description and ExecStart differ: the sandbox, restarts and stop timeout are the same.
    strip = ("Description", "ExecStart")
    assert {k: [d for d in v if d[0] not in strip] for k, v in template.items()} == \
        {k: [d for d in v if d[0] not in strip] for k, v in single.items()}
    assert "%i" in one(template["Unit"], "Description")
    # EnvironmentFile= overrides Environment=, so the per-instance values go on the command line.
    assert _template_exec_start() == ["/usr/bin/env", "CONSUMER_NAME=%H-%i", "METRICS_PORT=%i", PROGRAM, "run"]
    assert not [v for k, v in template["Service"] if k == "Environment" and "CONSUMER_NAME" in v]


def _template_copy(tmp_path: Path, extra: str = "") -> Path:
    """The template in ``tmp_path`` with its program replaced by one that exists here; the instance's path."""
    true = shutil.which("true")
    assert true
    text = TEMPLATE.read_text()
    assert PROGRAM in text
    (tmp_path / TEMPLATE.name).write_text(text.replace(PROGRAM, true) + extra)
    return tmp_path / "telemetry-processor@9464.service"


@needs_systemd_analyze
def test_template_instance_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    # An instance's path loads the template beside it, specifiers included.
    result = _verify(_template_copy(tmp_path))
    assert (result.returncode, result.stderr) == (0, ""), result.stderr
    broken = _verify(_template_copy(tmp_path, "\n[Service]\nRestart=sometimes\n"))
    assert "restart specifier" in broken.stderr


def _as_systemd_runs(instance: str, shared_env: dict[str, str]) -> subprocess.Popen[str]:
    """The template's ExecStart for ``instance``, specifiers expanded as systemd does (%H the host
    name, %i the instance), the shared EnvironmentFile's values in the environment, and the
    program replaced by this checkout's."""
    argv = [part.replace("%H", socket.gethostname()).replace("%i", instance) for part in _template_exec_start()]
    assert argv[-2:] == [PROGRAM, "run"]
    argv[-2:] = [sys.executable, str(ROOT / "processor.py"), "run"]
    return subprocess.Popen(argv, env=shared_env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


@pytest.mark.backends("plain")  # the unit, not the database
def test_two_template_instances_share_the_group_with_their_own_names_and_ports(service_env, redis_client, pg_url,
                                                                               keys) -> None:
    from tests.helpers import free_port, payload, pending_count, publish, row_count, wait_until

    ports = [free_port() for _ in range(2)]
    # The shared file may name a CONSUMER_NAME and a METRICS_PORT: the instance's own win.
    shared = dict(service_env, CONSUMER_NAME="shared-name", METRICS_PORT="1", METRICS_HOST="127.0.0.1",
                  LOG_FORMAT="text")
    procs = [_as_systemd_runs(str(port), shared) for port in ports]
    try:
        wait_until(lambda: all(_ready(port) for port in ports), 30, 0.1, "both instances ready")
        publish(redis_client, keys["stream"], [payload(f"dev{i % 50}", 1_700_000_000_000 + i * 1000)
                                               for i in range(2000)])
        wait_until(lambda: row_count(pg_url) == 2000 and
                   pending_count(redis_client, keys["stream"], keys["group"]) == 0, 60, 0.1, "2,000 rows")
        consumers = {c["name"].decode() for c in redis_client.xinfo_consumers(keys["stream"], keys["group"])}
    finally:
        for proc in procs:
            proc.terminate()
        outputs = [proc.communicate(timeout=30)[0] for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0], outputs
    host = socket.gethostname()
    assert consumers == {f"{host}-{port}" for port in ports}
    for port, output in zip(ports, outputs):
        assert f"consumer {host}-{port}" in output, output[-2000:]


def test_a_template_instance_that_is_not_a_port_exits_2_in_one_line(service_env) -> None:
    proc = _as_systemd_runs("blue", dict(service_env, LOG_FORMAT="text"))
    output = proc.communicate(timeout=30)[0]
    from processor.cli import EXIT_CONFIG

    assert proc.returncode == EXIT_CONFIG  # RestartPreventExitStatus: not restarted in a loop
    assert output.strip().splitlines() == ["telemetry-processor: METRICS_PORT must be an integer from 0 to 65535 "
                                           "(0 disables the server), got 'blue'"]


def _ready(port: int) -> bool:
    from tests.helpers import http_get

    try:
        return http_get(f"http://127.0.0.1:{port}/readyz", timeout=2)[0] == 200
    except OSError:  # not listening yet
        return False


# --- cron ------------------------------------------------------------------------------------------

CRON = ROOT / "deploy" / "replay.cron"
CRON_FIELD = re.compile(r"^(\*|\d+(-\d+)?)(/\d+)?(,(\d+(-\d+)?)(/\d+)?)*$")


def _cron_job() -> tuple[list[str], str, str]:
    jobs = []
    for raw in CRON.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#") or re.match(r"^[A-Z_]+=", line):
            continue
        jobs.append(line)
    assert len(jobs) == 1, jobs
    fields = jobs[0].split(None, 6)
    return fields[:5], fields[5], fields[6]


def test_cron_line() -> None:
    schedule, user, command = _cron_job()
    assert len(schedule) == 5 and all(CRON_FIELD.match(f) for f in schedule), schedule
    assert schedule == ["*/5", "*", "*", "*", "*"]
    assert user == "telemetry"
    program = "/opt/telemetry-processor/.venv/bin/telemetry-processor"
    assert f"{program} replay --min-idle-ms 300000 --limit 50000" in command
    assert ". /etc/telemetry-processor/env" in command
    assert "| logger -t " in command
    assert "%" not in command, "cron turns % into a newline"
    assert CRON.read_text().endswith("\n"), "cron ignores a last line without a newline"


@pytest.mark.skipif(shutil.which("flock") is None, reason="flock (util-linux) is not installed")
def test_cron_command_loads_the_env_file_and_logs_the_outcome(tmp_path: Path) -> None:
    """Run the cron command itself under /bin/sh, with its paths pointed into a temp dir."""
    _, _, command = _cron_job()
    fake = tmp_path / "telemetry-processor"
    fake.write_text('#!/bin/sh\necho "args: $*"\necho "stream: $STREAM_KEY"\necho "pg: $POSTGRES_URL"\n'
                    'echo "claimed=3 inserted=2 duplicate=0 dead_lettered=0 failed=1"\nexit 1\n')
    fake.chmod(0o755)
    (tmp_path / "env").write_text("STREAM_KEY=from-env-file\n"
                                  "POSTGRES_URL='postgresql://u:p@h/db?sslmode=require&x=1'\n")
    replacements = {
        "/opt/telemetry-processor/.venv/bin/telemetry-processor": str(fake),
        "cd /opt/telemetry-processor": f"cd {tmp_path}",
        "/etc/telemetry-processor/env": str(tmp_path / "env"),
        "/run/lock/": f"{tmp_path}/",
        "logger -t telemetry-processor-replay": "cat",
    }
    for old, new in replacements.items():
        assert old in command, old
        command = command.replace(old, new)
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}

    out = run(["/bin/sh", "-c", command], env=env, timeout=30)
    assert out.returncode == 0
    assert out.stdout.splitlines() == [
        "args: replay --min-idle-ms 300000 --limit 50000",
        "stream: from-env-file",
        "pg: postgresql://u:p@h/db?sslmode=require&x=1",
        "claimed=3 inserted=2 duplicate=0 dead_lettered=0 failed=1",
        "replay exited with status 1",
    ]

    # While a previous run holds the lock, the new one does nothing and says nothing.
    lock = next(tmp_path.glob("*.lock"))
    with open(lock, "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        skipped = run(["/bin/sh", "-c", command], env=env, timeout=30)
    assert (skipped.returncode, skipped.stdout) == (0, "")


# --- env file example --------------------------------------------------------------------------------

def _env_example() -> list[tuple[bool, str, str]]:
    """(active, NAME, value) for each variable line; '#NAME=value' shows a default."""
    entries = []
    for raw in (ROOT / "deploy" / "telemetry-processor.env.example").read_text().splitlines():
        match = re.match(r"^(#?)([A-Z][A-Z0-9_]*)=(.*)$", raw)
        if match:
            entries.append((match.group(1) == "", match.group(2), match.group(3)))
    return entries


def test_env_example_names_exactly_the_configuration_variables() -> None:
    names = [name for _, name, _ in _env_example()]
    assert len(names) == len(set(names)), names
    assert set(names) == set(VARIABLES)


def test_env_example_defaults_are_the_real_defaults() -> None:
    field_of = {name: field for name, (field, _, _) in _SPEC.items()}
    for active, name, value in _env_example():
        if not value:
            assert not active and name == "CONSUMER_NAME"  # default: the host name
            continue
        config = load_config({name: value}, dotenv_path=None)
        if not active:
            assert getattr(config, field_of[name]) == getattr(DEFAULTS, field_of[name]), name


# --- build ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    result = run([sys.executable, "-m", "build", "--outdir", str(out), str(ROOT)], timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    return out


def test_build_makes_an_sdist_and_a_wheel_with_the_schema(dist: Path) -> None:
    sdists = list(dist.glob("*.tar.gz"))
    wheels = list(dist.glob("*.whl"))
    assert [p.name for p in sdists] == [f"telemetry_processor-{__version__}.tar.gz"]
    # a wheel for this Python and platform: it holds the decoder's compiled way
    tag = f"cp{sys.version_info.major}{sys.version_info.minor}"
    assert [p.name.split("-")[:3] for p in wheels] == [["telemetry_processor", __version__, tag]]
    with zipfile.ZipFile(wheels[0]) as wheel:
        names = set(wheel.namelist())
        assert {"processor/schema.sql", "processor/cli.py", "processor/core/db.py"} <= names
        assert any(re.fullmatch(r"processor/core/_speedups\.cpython-.*\.so", name) for name in names), names
        assert wheel.read("processor/schema.sql") == (ROOT / "processor" / "schema.sql").read_bytes()
        entry_points = wheel.read(f"telemetry_processor-{__version__}.dist-info/entry_points.txt").decode()
    assert re.search(r"^telemetry-processor = processor\.cli:main$", entry_points, re.MULTILINE)
    with tarfile.open(sdists[0]) as sdist:
        assert f"telemetry_processor-{__version__}/processor/core/_speedups.c" in sdist.getnames()


@pytest.mark.slow
@pytest.mark.backends("plain")  # packaging; migrate on a hypertable: test_timescaledb.py
def test_installed_wheel_runs_version_and_migrate(dist: Path, tmp_path: Path, empty_pg_url: str) -> None:
    """A fresh venv, the wheel from PyPI's dependencies, run from a directory that holds no source."""
    (wheel,) = dist.glob("*.whl")
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    pip = run([str(env_dir / "bin" / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check",
               str(wheel)], timeout=600)
    assert pip.returncode == 0, pip.stderr[-2000:]
    program = str(env_dir / "bin" / "telemetry-processor")
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("REDIS_", "POSTGRES_", "PYTHON", "VIRTUAL_ENV"))}
    workdir = tmp_path / "run"
    workdir.mkdir()

    version = run([program, "--version"], cwd=workdir, env=env, timeout=60)
    assert (version.returncode, version.stdout.strip()) == (0, f"telemetry-processor {__version__}")

    migrate = run([program, "migrate"], cwd=workdir, env={**env, "POSTGRES_URL": empty_pg_url}, timeout=120)
    assert migrate.returncode == 0, migrate.stderr[-2000:]
    conn = psycopg2.connect(empty_pg_url)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT to_regclass('public.positions') IS NOT NULL")
            assert cur.fetchone() == (True,)
    finally:
        conn.close()
