"""The benchmark harness in its quick mode (issues 6, 12, 13): it runs end to end and its JSON has every section,
on both backends: a plain table and, where TimescaleDB is installed, a hypertable.

``bench/run.py --quick`` moves 2,000 positions through each contender. No timing is
asserted (CI machines vary): only that every contender moved exactly the positions it
was given, that every figure is a positive number, and that the table was printed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from processor.devservers import timescaledb_installed

ROOT = Path(__file__).resolve().parent.parent
QUICK_POSITIONS = 2_000
SECTIONS = ("server", "ceiling", "catch_up", "baseline", "latency", "memory", "scale_out", "ratios", "targets")


def _positive(section: dict[str, Any], *names: str) -> None:
    for name in names:
        value = section[name]
        assert isinstance(value, (int, float)) and value > 0, f"{name} = {value!r}"


def _drained_exactly(section: dict[str, Any], positions: int) -> None:
    assert section["positions"] == positions
    assert section["rows"] == positions
    assert section["dead_letters"] == 0
    _positive(section, "seconds", "per_s", "seconds_from_first_read", "per_s_from_first_read")
    assert all(code == 0 for code in section["exit_codes"]), section["exit_codes"]
    assert set(section["cpu_us_per_position"]) == {"main_thread", "main_thread_kernel", "other_threads",
                                                   "postgres_backends", "redis_server"}


def _check_backend(results: dict[str, Any]) -> None:
    assert set(SECTIONS) <= set(results), set(SECTIONS) - set(results)
    ceiling = results["ceiling"]
    assert ceiling["positions"] == ceiling["rows"] == QUICK_POSITIONS
    _positive(ceiling, "seconds", "per_s")
    _drained_exactly(results["catch_up"], QUICK_POSITIONS)
    _drained_exactly(results["baseline"], QUICK_POSITIONS)
    assert [s["instances"] for s in results["scale_out"]] == [1, 2, 3]
    for run in results["scale_out"]:
        _drained_exactly(run, QUICK_POSITIONS)

    latency = results["latency"]
    assert latency["positions"] > 0
    assert latency["rows"] == latency["metric_observations"] == latency["positions"]
    assert latency["exit_code"] == 0
    _positive(latency, "achieved_per_s", "db_p50_ms", "db_p99_ms", "db_max_ms", "metric_p50_ms", "metric_p99_ms",
              "metric_share_within_200ms")
    assert latency["db_p50_ms"] <= latency["db_p99_ms"] <= latency["db_max_ms"]

    memory = results["memory"]
    assert memory["rows"] == memory["devices_tracked"] == memory["devices"] == 2_000
    assert memory["exit_code"] == 0
    _positive(memory, "peak_rss_mb")

    _positive(results["ratios"], "catch_up_vs_ceiling", "catch_up_vs_baseline")
    assert set(results["targets"]) == {"catch_up_vs_ceiling", "catch_up_vs_baseline", "latency_p99_ms",
                                       "peak_rss_mb"}
    assert all(isinstance(t["met"], bool) for t in results["targets"].values())


@pytest.mark.backends("plain")  # bench/run.py makes its own databases of each kind
def test_quick_benchmark_runs_every_contender_on_both_backends(redis_url: str, pg_admin_url: str,
                                                               tmp_path: Path) -> None:
    out = tmp_path / "results.json"
    env = {**os.environ, "REDIS_URL": redis_url, "POSTGRES_URL": pg_admin_url}
    env.pop("TIMESCALEDB_URL", None)
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "run.py"), "--quick", "--out", str(out)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = json.loads(out.read_text())

    assert results["quick"] is True
    assert results["scale"]["positions"] == QUICK_POSITIONS
    assert results["machine"]["cores"] >= 1 and results["machine"]["postgresql"]
    assert list(results["backends"]) == ["plain", "timescaledb"]
    # The harness checks each fresh database's table kind; a run that got it wrong would have failed.
    _check_backend(results["backends"]["plain"])
    hypertable = results["backends"]["timescaledb"]
    if timescaledb_installed():
        _check_backend(hypertable)
        assert hypertable["server"]["timescaledb"]
    else:
        assert hypertable == {"skipped": "the TimescaleDB library is not installed beside this PostgreSQL"}
    gateway = results["gateway"]  # the gateway section: both phases ran, every client was served to the end
    for phase in ("all", "devices"):
        run = gateway[phase]
        assert run["clients"] == run["subscribed_before_start"] == 50 and run["dropped_clients"] == 0, run
        assert run["published"] > 0 and run["latency_samples"] > 0 and run["gateway_exit"] == 0, run
        _positive(run, "p50_ms", "p99_ms", "delivered_per_s", "gateway_peak_rss_mb")
    for line in ("COPY ceiling", "processor catch-up", "baseline (bench/baseline.py)", "plain PostgreSQL table",
                 "TimescaleDB hypertable", "latency at", "targets:"):
        assert line in proc.stdout
