"""Start-up against servers that are not there yet, and the simulator against a running service."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time

import pytest

from tests.helpers import ROOT, ServiceProcess, pending_count, row_count, wait_until


@pytest.mark.backends("plain")  # connection retries: no table involved
def test_postgres_unreachable_at_start_retries_with_growing_delays_then_gets_ready(
        throwaway_postgres_factory, service_env):
    server = throwaway_postgres_factory(schema=False)
    server.stop()
    env = dict(service_env, POSTGRES_URL=server.url)
    with ServiceProcess(env) as proc:
        wait_until(lambda: sum("connect to PostgreSQL failed" in m for m in proc.messages()) >= 4, 30,
                   message="four failed attempts")
        server.start()
        proc.wait_for_log("processor ready", timeout=30)
        logs = proc.logs()
        proc.signal(signal.SIGTERM)
        assert proc.wait(15) == 0
    attempts = [e for e in logs if "connect to PostgreSQL failed" in e.get("msg", "")]
    assert all(e["level"] == "warning" for e in attempts)
    assert all("exc" not in e and "Traceback" not in e["msg"] for e in attempts)  # one line, no traceback
    delays = [float(re.search(r"retrying in ([\d.]+)s", e["msg"]).group(1)) for e in attempts]
    assert delays[:4] == [0.5, 1.0, 2.0, 4.0]
    numbers = [int(re.search(r"attempt (\d+)", e["msg"]).group(1)) for e in attempts]
    assert numbers == list(range(1, len(numbers) + 1))
    assert any("migrations applied" in e.get("msg", "") for e in logs)  # the schema came with the server


def test_simulate_count_1_gives_one_row_within_a_second(service_env, redis_client, pg_url, keys):
    with ServiceProcess(service_env) as proc:
        proc.wait_for_log("processor ready")
        result = subprocess.run([sys.executable, str(ROOT / "processor.py"), "simulate", "--count", "1"],
                                env=service_env, cwd=str(ROOT), capture_output=True, text=True, timeout=30)
        published = time.monotonic()
        assert result.returncode == 0, result.stderr
        assert "published 1 positions" in result.stderr
        wait_until(lambda: row_count(pg_url) == 1, 5)
        assert time.monotonic() - published < 1.0
        wait_until(lambda: pending_count(redis_client, keys["stream"], keys["group"]) == 0, 5)
        proc.signal(signal.SIGTERM)
        assert proc.wait(15) == 0


@pytest.mark.backends("plain")  # connection retries: no table involved
@pytest.mark.parametrize("server", ["redis", "postgres"])
def test_start_up_failures_are_counted_and_shown_on_readyz(service_env, server):
    """While the service cannot get started, /readyz says why (not "no Redis read yet") and each failed
    attempt is counted in the server's error counter."""
    from tests.helpers import free_port, http_get, metric_value

    port = free_port()
    env = dict(service_env, METRICS_HOST="127.0.0.1", METRICS_PORT=str(port))
    if server == "redis":
        env["REDIS_URL"] = f"redis://127.0.0.1:{free_port()}/0"
        attempt = "connect to Redis failed"
    else:
        env["POSTGRES_URL"] = f"postgresql://postgres@127.0.0.1:{free_port()}/postgres"
        attempt = "connect to PostgreSQL failed"
    with ServiceProcess(env) as proc:
        wait_until(lambda: sum(attempt in m for m in proc.messages()) >= 3, 30, message="three failed attempts")
        status, why = http_get(f"http://127.0.0.1:{port}/readyz")
        _, text = http_get(f"http://127.0.0.1:{port}/metrics")
        failures = sum(attempt in m for m in proc.messages())
        proc.signal(signal.SIGTERM)
        assert proc.wait(15) == 0
    counted = metric_value(text, f"processor_{server}_errors_total")
    assert status == 503 and f"{server}: " in why and "refused" in why.lower(), why
    assert counted is not None and failures - 1 <= counted <= failures + 1, (counted, failures)
