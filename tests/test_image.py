"""The container image, built from the Dockerfile with podman and run against throwaway servers (issue 12).

Slow (a build, then containers): it runs in ``make test`` when podman is installed and skips
without it (fails in CI, where .ci/run installs podman and the base image). The build context
is a copy of the checkout with a ``.env`` holding a secret, as a developer's working tree has:
.dockerignore must keep it out.

How containers run on these machines (../shared/tools/container-base-image.sh): runtime runc,
two ulimit flags, the host's network (the throwaway servers listen on 127.0.0.1), and
``--isolation chroot`` for the build. ``--format docker`` keeps the HEALTHCHECK (OCI has none).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import (BASE_MS, ROOT, free_port, hold_write_lock, http_get, payload, pending_count, publish,
                           row_count, wait_until)
from tests.test_packaging import _HealthServer

pytestmark = [pytest.mark.slow, pytest.mark.backends("timescaledb")]  # production's database

BASE_IMAGE = "docker.io/library/python:3.11-slim"
RUN_FLAGS = ["--runtime", "runc", "--ulimit", "nofile=4096:4096", "--ulimit", "nproc=4096:4096",
             "--network", "host"]
SECRET = f"not-for-the-image-{uuid.uuid4().hex}"
BUILD_TOOLS = ("gcc", "cc", "c++", "g++", "make", "ld", "as", "cpp", "git")
# Run inside the image: what it holds that it should not.
INSPECT = f"""
import json, os, shutil
found = {{"dotenv": [], "tests": [], "secret": [], "headers": os.path.exists("/usr/include/python3.11/Python.h")}}
for top in ("/app", "/usr/local", "/usr/lib/python3", "/etc", "/root", "/tmp", "/nonexistent"):
    for dirpath, dirnames, filenames in os.walk(top):
        found["dotenv"] += [os.path.join(dirpath, f) for f in filenames if f == ".env"]
        found["tests"] += [os.path.join(dirpath, d) for d in dirnames if dirpath.startswith("/app") and d == "tests"]
        for f in filenames:
            path = os.path.join(dirpath, f)
            try:
                if os.path.isfile(path) and not os.path.islink(path) and os.path.getsize(path) < 2_000_000:
                    with open(path, "rb") as fh:
                        if {SECRET!r}.encode() in fh.read():
                            found["secret"].append(path)
            except OSError:
                pass
found["tools"] = [t for t in {BUILD_TOOLS!r} if shutil.which(t)]
found["uid"], found["gid"] = os.getuid(), os.getgid()
found["app"] = sorted(os.listdir("/app"))
from processor.core import decode  # /app's package, as `python processor.py` imports it
found["compiled"] = decode.COMPILED and decode._speedups.__file__
print(json.dumps(found))
"""


def _missing(message: str) -> None:
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(message)
    pytest.skip(message)


def podman(*args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(["podman", *args], capture_output=True, text=True, timeout=timeout)
    if check:
        assert result.returncode == 0, f"podman {' '.join(args[:3])}: {result.stderr[-3000:]}"
    return result


def _build_context(tmp: Path) -> Path:
    """The checkout's tracked files (plus what is not committed yet), and a .env with a secret."""
    context = tmp / "context"
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, check=True).stdout.decode().split("\0")
    for name in filter(None, files):
        src, dst = ROOT / name, context / name
        if not src.exists() and not src.is_symlink():
            continue  # deleted in the working tree
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_symlink():
            dst.symlink_to(os.readlink(src))
        else:
            shutil.copy2(src, dst)
    (context / ".env").write_text(f"POSTGRES_URL=postgresql://app:{SECRET}@db/telemetry\n")
    return context


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    if shutil.which("podman") is None:
        _missing("podman is not installed (.ci/run installs it): the image test needs it")
    if podman("image", "exists", BASE_IMAGE, check=False).returncode != 0:
        _missing(f"{BASE_IMAGE} is not here: run ../shared/tools/container-base-image.sh (.ci/run does)")
    tag = f"localhost/telemetry-processor:test-{uuid.uuid4().hex[:8]}"
    context = _build_context(tmp_path_factory.mktemp("image"))
    started = time.monotonic()
    build = podman("build", "--format", "docker", "--isolation", "chroot", "--network", "host", "--pull=never",
                   "-t", tag, str(context), timeout=900, check=False)
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    size = int(podman("image", "inspect", tag, "--format", "{{.Size}}").stdout)
    base = int(podman("image", "inspect", BASE_IMAGE, "--format", "{{.Size}}").stdout)
    print(f"measured: image built in {time.monotonic() - started:.0f}s, {size / 1e6:.0f} MB "
          f"({(size - base) / 1e6:.1f} MB over the {base / 1e6:.0f} MB base image)")
    warnings = [line for line in (build.stdout + build.stderr).splitlines() if "warn" in line.lower()]
    assert warnings == [], warnings  # a dropped HEALTHCHECK, pip as root, a system uid out of range
    try:
        yield tag
    finally:
        podman("rmi", "-f", tag, check=False)


class Container:
    """One detached container of the image; removed at the end."""

    def __init__(self, image: str, env: dict[str, str]) -> None:
        self.name = f"tp-test-{uuid.uuid4().hex[:10]}"
        flags = [f"--env={k}={v}" for k, v in env.items()]
        # The healthcheck's timer needs systemd, which is not here: `podman healthcheck run` runs it.
        podman("run", "-d", "--name", self.name, *RUN_FLAGS, "--health-interval=disable", *flags, image)

    def inspect(self, template: str) -> str:
        return podman("inspect", self.name, "--format", template).stdout.strip()

    def running(self) -> bool:
        """Not exited yet: running, or stopping (podman's state between the stop signal and the exit)."""
        return self.inspect("{{.State.Status}}") in ("running", "stopping")

    def logs(self) -> str:
        result = podman("logs", self.name, check=False)
        return result.stdout + result.stderr

    def messages(self) -> list[str]:
        out = []
        for line in self.logs().splitlines():
            try:
                out.append(json.loads(line).get("msg", ""))
            except ValueError:
                out.append(line)
        return out

    def healthcheck(self) -> int:
        return podman("healthcheck", "run", self.name, check=False, timeout=60).returncode

    def remove(self) -> None:
        podman("rm", "-f", "-t", "0", self.name, check=False)


@pytest.fixture
def container_env(throwaway_redis: Any, throwaway_postgres: Any, keys: dict[str, str]) -> dict[str, str]:
    return {"REDIS_URL": throwaway_redis.url, "POSTGRES_URL": throwaway_postgres.url, "STREAM_KEY": keys["stream"],
            "CONSUMER_GROUP": keys["group"], "CONSUMER_NAME": keys["consumer"], "DEAD_LETTER_STREAM": keys["dead"],
            "METRICS_HOST": "127.0.0.1", "METRICS_PORT": str(free_port()), "BLOCK_MS": "200"}


@pytest.fixture
def start_container(image: str) -> Iterator[Any]:
    made: list[Container] = []

    def start(env: dict[str, str]) -> Container:
        container = Container(image, env)
        made.append(container)
        return container

    yield start
    for container in made:
        container.remove()


def _ready(env: dict[str, str]) -> bool:
    try:
        return http_get(f"http://127.0.0.1:{env['METRICS_PORT']}/readyz", timeout=2)[0] == 200
    except OSError:
        return False


def test_the_image_holds_the_service_only_and_runs_as_a_non_root_user(image: str) -> None:
    user = podman("image", "inspect", image, "--format", "{{.Config.User}}").stdout.strip()
    assert user == "10001:10001"
    result = podman("run", "--rm", *RUN_FLAGS, "--health-interval=disable", image, "python", "-c", INSPECT)
    found = json.loads(result.stdout)
    assert (found["uid"], found["gid"]) == (10001, 10001)
    assert found["dotenv"] == [] and found["secret"] == [], found
    assert found["tests"] == [] and found["tools"] == [] and found["headers"] is False, found
    # the decoder's compiled way, built in the build stage, beside the source the service imports
    assert str(found["compiled"]).startswith("/app/processor/core/_speedups."), found["compiled"]
    assert found["app"] == ["README.md", "__pycache__", "processor", "processor.py", "pyproject.toml",
                            "schema.sql"]


def test_the_image_gets_ready_writes_positions_and_its_healthcheck_follows_healthz(
        start_container: Any, container_env: dict[str, str], throwaway_redis: Any, throwaway_postgres: Any,
        keys: dict[str, str]) -> None:
    container = start_container(container_env)
    wait_until(lambda: _ready(container_env) or not container.running(), 60, 0.2, "the container ready")
    assert container.running(), container.logs()[-3000:]
    client = throwaway_redis.client()
    try:
        publish(client, keys["stream"], [payload(f"img{i % 20}", BASE_MS + i * 1000) for i in range(1000)])
        wait_until(lambda: row_count(throwaway_postgres.url) == 1000
                   and pending_count(client, keys["stream"], keys["group"]) == 0, 60, 0.1, "1,000 rows")
    finally:
        client.close()
    assert "migrations applied: positions is a TimescaleDB hypertable" in container.messages()
    assert container.healthcheck() == 0

    # /healthz refusing (503) or not answering: the image's own command, as its HEALTHCHECK runs it, fails.
    command = json.loads(podman("image", "inspect", container.inspect("{{.ImageName}}"),
                                "--format", "{{json .Config.Healthcheck.Test}}").stdout)
    assert command[0] == "CMD"
    with _HealthServer() as fake:
        fake.status = 503
        refused = podman("exec", "-e", f"METRICS_PORT={fake.port}", container.name, *command[1:], check=False)
        fake.status = 200
        answered = podman("exec", "-e", f"METRICS_PORT={fake.port}", container.name, *command[1:], check=False)
    assert (refused.returncode, answered.returncode) == (1, 0), refused.stderr
    pid = int(container.inspect("{{.State.Pid}}"))
    os.kill(pid, signal.SIGSTOP)  # a hung process: /healthz stops answering
    try:
        assert container.healthcheck() != 0
    finally:
        os.kill(pid, signal.SIGCONT)
    wait_until(lambda: container.healthcheck() == 0, 30, 0.5, "healthy again")


def test_sigterm_during_a_write_wait_exits_0_with_every_acknowledged_entry_stored(
        start_container: Any, container_env: dict[str, str], throwaway_redis: Any, throwaway_postgres: Any,
        keys: dict[str, str]) -> None:
    client = throwaway_redis.client()
    publish(client, keys["stream"], [payload(f"img{i % 10}", BASE_MS + i) for i in range(500)])
    blocker = hold_write_lock(throwaway_postgres.url)
    try:
        container = start_container(container_env)
        wait_until(lambda: pending_count(client, keys["stream"], keys["group"]) == 500 or not container.running(),
                   60, 0.1, "500 entries read and waiting on the lock")
        assert container.running(), container.logs()[-3000:]
        assert row_count(throwaway_postgres.url) == 0
        # As `docker stop` does: the image's STOPSIGNAL, then a wait longer than SHUTDOWN_TIMEOUT_S.
        stopper = subprocess.Popen(["podman", "stop", "-t", "30", container.name], stdout=subprocess.DEVNULL,
                                   stderr=subprocess.PIPE, text=True)
        time.sleep(2)
        assert container.inspect("{{.State.Status}}") == "stopping", "it must wait for the in-flight write"
        blocker.rollback()
        assert stopper.wait(40) == 0, stopper.stderr.read() if stopper.stderr else ""
    finally:
        blocker.close()
    assert container.inspect("{{.State.ExitCode}}") == "0", container.logs()[-3000:]
    try:
        assert pending_count(client, keys["stream"], keys["group"]) == 0
    finally:
        client.close()
    assert row_count(throwaway_postgres.url) == 500
    assert "processor stopped" in container.messages()
