"""The gateway's operations files against the code: dashboard, systemd unit, compose service, config loader."""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import pytest
import yaml
from prometheus_client import CollectorRegistry

from processor.core.errors import ConfigError
from processor.gateway.config import VARIABLES, load_gateway_config
from processor.gateway.metrics import GatewayMetrics
from tests.helpers import ROOT

DASHBOARD = ROOT / "deploy" / "grafana" / "telemetry-gateway.json"
UNIT = ROOT / "deploy" / "telemetry-gateway.service"
NAME = re.compile(r"\bgateway_[a-z_]+\b")


def _families() -> dict[str, set[str]]:
    registry = CollectorRegistry()
    GatewayMetrics(registry=registry, version="test")
    return {f.name: {s.name for s in f.samples if not s.name.endswith("_created")} for f in registry.collect()}


def _expressions() -> list[str]:
    return [t["expr"] for p in json.loads(DASHBOARD.read_text())["panels"] for t in p["targets"]]


def test_dashboard_charts_every_gateway_metric_and_only_those():
    families = _families()
    exported = set().union(*families.values())
    used = {n for e in _expressions() for n in NAME.findall(e)}
    assert used <= exported, used - exported
    assert [f for f, samples in families.items() if not samples & used] == []
    board = json.loads(DASHBOARD.read_text())
    assert board["uid"] == "telemetry-gateway"
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids))
    cells: set[tuple[int, int]] = set()
    for p in board["panels"]:
        g = p["gridPos"]
        assert g["x"] + g["w"] <= 24
        mine = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        assert not mine & cells, p["title"]
        cells |= mine


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool is not installed (Debian package prometheus)")
def test_dashboard_promql_parses(tmp_path):
    rules = [{"record": f"dashboard:gateway_{i}", "expr": e.replace("$__rate_interval", "5m")
              .replace("$instance", ".+").replace("$job", ".+")} for i, e in enumerate(_expressions())]
    path = tmp_path / "rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "gateway", "rules": rules}]}))
    result = subprocess.run(["promtool", "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_unit_runs_the_gateway_command():
    text = UNIT.read_text()
    assert re.search(r"^ExecStart=/opt/telemetry-processor/\.venv/bin/telemetry-processor gateway$", text, re.M)
    assert re.search(r"^RestartPreventExitStatus=2$", text, re.M)
    assert re.search(r"^EnvironmentFile=/etc/telemetry-processor/env$", text, re.M)


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_unit_passes_systemd_analyze_verify(tmp_path):
    true = shutil.which("true")
    unit = tmp_path / UNIT.name
    unit.write_text(re.sub(r"^ExecStart=\S+", f"ExecStart={true}", UNIT.read_text(), count=1, flags=re.M))
    result = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60,
                            env={"SYSTEMD_LOG_COLOR": "0", "PATH": "/usr/bin:/bin"})
    assert (result.returncode, result.stderr) == (0, ""), result.stderr


def test_compose_gateway_service_is_the_same_image_with_command_gateway():
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    gateway, processor = compose["services"]["gateway"], compose["services"]["processor"]
    assert gateway["image"] == processor["image"] and gateway["command"] == ["python", "processor.py", "gateway"]
    assert gateway["profiles"] == ["app"]
    # Its values, compose's ${VAR:-default} at their defaults, pass the gateway's own checks.
    env = {k: re.sub(r"\$\{[A-Z_]+:-([^}]*)\}", r"\1", str(v)) for k, v in gateway["environment"].items()}
    load_gateway_config(env, dotenv_path=None)
    assert any(str(p).endswith(":8765") for p in gateway["ports"])
    assert "/healthz" in " ".join(gateway["healthcheck"]["test"])


def test_env_example_names_every_gateway_variable():
    text = (ROOT / "deploy" / "telemetry-gateway.env.example").read_text()
    named = set(re.findall(r"^#?\s*(GATEWAY_[A-Z_]+)=", text, re.M))
    assert named == set(VARIABLES)


@pytest.mark.parametrize("env, message", [
    ({}, "GATEWAY_TOKEN_SECRET must be set (the HS256 key Directus signs tokens with) unless GATEWAY_PUBLIC=true"),
    ({"GATEWAY_PUBLIC": "maybe"}, "GATEWAY_PUBLIC must be true or false, got 'maybe'"),
    ({"GATEWAY_PUBLIC": "true", "GATEWAY_ALLOWED_ORIGINS": "map.example.com"},
     "GATEWAY_ALLOWED_ORIGINS must be a comma-separated list of origins such as https://map.example.com, "
     "got 'map.example.com'"),
    ({"GATEWAY_PUBLIC": "true", "GATEWAY_TILE_URL": "https://t.example/{z}/{x}.png"},
     "GATEWAY_TILE_URL must be an http(s) URL template with {z}, {x} and {y}, or empty, "
     "got 'https://t.example/{z}/{x}.png'"),
    ({"GATEWAY_PUBLIC": "true", "GATEWAY_SLOW_CLIENT_S": "0"},
     "GATEWAY_SLOW_CLIENT_S must be a positive number (seconds), got '0'"),
    ({"GATEWAY_PUBLIC": "true", "BATCH_SIZE": "x"}, "BATCH_SIZE must be a positive integer, got 'x'"),
])
def test_bad_configuration_names_the_variable(env, message):
    with pytest.raises(ConfigError) as exc:
        load_gateway_config(env, dotenv_path=None)
    assert str(exc.value) == message


def test_configuration_defaults_and_values():
    config = load_gateway_config({"GATEWAY_TOKEN_SECRET": "k" * 32,
                                  "GATEWAY_ALLOWED_ORIGINS": "https://A.example.com/, http://b.example:8080",
                                  "STREAM_KEY": "s"}, dotenv_path=None)
    assert (config.host, config.port, config.token_issuer, config.public, config.flush_ms, config.max_clients,
            config.slow_client_s, config.snapshot_hours, config.tile_url) == \
        ("0.0.0.0", 8765, "directus", False, 100, 10_000, 10.0, 24.0, "")
    assert config.allowed_origins == ("https://a.example.com", "http://b.example:8080")
    assert config.core.stream_key == "s"
    assert config.describe()["token_secret"] == "***"
