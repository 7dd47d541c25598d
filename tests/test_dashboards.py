"""The Grafana dashboard and the Prometheus alert rules against the metrics the service really exports.

The exported names come from a real ``Metrics`` on a fresh registry. promtool
(Debian package ``prometheus``) checks the rule file, the dashboard's PromQL and
the exposition format, and unit-tests every alert on synthetic series; those
checks skip where promtool is not installed.
"""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from prometheus_client import CollectorRegistry, generate_latest

from processor.core.metrics import E2E_BUCKETS, Metrics

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "deploy" / "grafana" / "telemetry-processor.json"
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"
METRIC_NAME = re.compile(r"\bprocessor_[a-z_]+\b")
REQUIRED_ALERTS = {
    "TelemetryProcessorLagGrowing", "TelemetryProcessorNoWrites", "TelemetryProcessorDeadLetters",
    "TelemetryProcessorNotReady", "TelemetryProcessorEndToEndSlow", "TelemetryProcessorPostgresErrors",
    "TelemetryProcessorRedisErrors", "TelemetryProcessorEntriesLost",
}
# Template variables of the dashboard, replaced by values PromQL accepts (for promtool).
GRAFANA_VARIABLES = {"$__rate_interval": "5m", "$instance": ".+", "$job": ".+"}
JOB = "telemetry-processor"
SERIES_LABELS = f'job="{JOB}", instance="a:9464"'

needs_promtool = pytest.mark.skipif(shutil.which("promtool") is None,
                                    reason="promtool is not installed (Debian package prometheus)")


def fresh_metrics() -> Metrics:
    return Metrics(registry=CollectorRegistry(), version="0.0.0-test")


def exported_sample_names() -> set[str]:
    names = {sample.name for family in fresh_metrics().registry.collect() for sample in family.samples}
    return names | {"up"}


def exported_families() -> dict[str, set[str]]:
    """Family name -> its sample names (``_created`` left out: nothing should chart it)."""
    return {family.name: {s.name for s in family.samples if not s.name.endswith("_created")}
            for family in fresh_metrics().registry.collect()}


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def panels(board: dict) -> list[dict]:
    out = []
    for panel in board["panels"]:
        out.append(panel)
        out.extend(panel.get("panels", []))  # panels inside collapsed rows
    return out


def dashboard_expressions(board: dict) -> list[str]:
    return [t["expr"] for p in panels(board) for t in p.get("targets", []) if t.get("expr")]


def alert_rules() -> list[dict]:
    return [rule for group in yaml.safe_load(ALERTS.read_text())["groups"] for rule in group["rules"]]


def promtool(*args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(["promtool", *args], check=False, input=stdin, capture_output=True, timeout=120)


# --- the dashboard -------------------------------------------------------------------------------------

def test_dashboard_loads_with_a_prometheus_datasource_input() -> None:
    board = dashboard()
    assert 36 <= board["schemaVersion"] <= 41
    assert board["uid"] == "telemetry-processor"
    inputs = {i["name"]: i for i in board["__inputs"]}
    assert inputs["DS_PROMETHEUS"]["pluginId"] == "prometheus"
    for panel in panels(board):
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == "${DS_PROMETHEUS}", panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${DS_PROMETHEUS}", panel["title"]
    ids = [p["id"] for p in panels(board)]
    assert len(ids) == len(set(ids))


def test_dashboard_panels_fit_the_grid_without_overlapping() -> None:
    cells: dict[tuple[int, int], str] = {}
    for panel in panels(dashboard()):
        pos = panel["gridPos"]
        assert pos["x"] >= 0 and pos["x"] + pos["w"] <= 24, panel["title"]
        for x in range(pos["x"], pos["x"] + pos["w"]):
            for y in range(pos["y"], pos["y"] + pos["h"]):
                assert (x, y) not in cells, f"{panel['title']} overlaps {cells[(x, y)]}"
                cells[(x, y)] = panel["title"]


def test_dashboard_names_only_exported_metrics() -> None:
    exported = exported_sample_names()
    for expr in dashboard_expressions(dashboard()):
        for name in METRIC_NAME.findall(expr):
            assert name in exported, f"{name} (in {expr!r}) is not exported"


def test_dashboard_charts_every_exported_metric() -> None:
    text = "\n".join(dashboard_expressions(dashboard()))
    used = set(METRIC_NAME.findall(text))
    missing = [family for family, samples in exported_families().items() if not samples & used]
    assert missing == [], f"exported but not on the dashboard: {missing}"
    assert re.search(r"\bup\{", text)
    for quantile in ("0.5", "0.99"):
        for histogram in ("processor_batch_write_seconds_bucket", "processor_end_to_end_seconds_bucket"):
            assert re.search(rf"histogram_quantile\({quantile}, sum by \(le\) \(rate\({histogram}\b", text)
    assert "sum by (status) (rate(processor_records_written_total" in text
    assert "sum by (reason) (increase(processor_records_dead_lettered_total" in text


@needs_promtool
def test_dashboard_promql_parses(tmp_path: Path) -> None:
    """Each expression, template variables filled in, as a recording rule: promtool parses them all."""
    rules = []
    for i, expr in enumerate(dashboard_expressions(dashboard())):
        for variable, value in GRAFANA_VARIABLES.items():
            expr = expr.replace(variable, value)
        assert "$" not in expr, expr
        rules.append({"record": f"dashboard:panel_{i}", "expr": expr})
    path = tmp_path / "dashboard-rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = promtool("check", "rules", str(path))
    assert result.returncode == 0, result.stdout.decode() + result.stderr.decode()


# --- the alert rules -------------------------------------------------------------------------------------

def test_alerts_are_documented_and_name_only_exported_metrics() -> None:
    rules = alert_rules()
    names = [rule["alert"] for rule in rules]
    assert len(names) == len(set(names))
    assert REQUIRED_ALERTS <= set(names)
    exported = exported_sample_names()
    for rule in rules:
        name = rule["alert"]
        assert name.startswith("TelemetryProcessor")
        assert rule["labels"]["severity"] in ("warning", "critical"), name
        annotations = rule["annotations"]
        assert annotations["summary"] and annotations["description"], name
        assert annotations["runbook_url"] == f"README.md#alert-{name.lower()}"
        for metric in METRIC_NAME.findall(rule["expr"]):
            assert metric in exported, f"{name}: {metric} is not exported"
    not_ready = next(r for r in rules if r["alert"] == "TelemetryProcessorNotReady")
    assert not_ready["expr"].strip() == "processor_ready == 0" and not_ready["for"] == "2m"


def _github_anchors(markdown: str) -> set[str]:
    anchors = set(re.findall(r'<a\s+(?:id|name)="([^"]+)"', markdown))
    for heading in re.findall(r"^#{1,6}\s+(.+?)\s*#*$", markdown, re.MULTILINE):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        anchors.add(slug)
    return anchors


def test_alert_runbook_anchors_exist_in_the_readme() -> None:
    readme = ROOT / "README.md"
    if not readme.exists():
        pytest.skip("README.md is not written yet")
    anchors = _github_anchors(readme.read_text())
    missing = [r["alert"] for r in alert_rules()
               if r["annotations"]["runbook_url"].split("#", 1)[1] not in anchors]
    assert missing == [], f"README.md has no heading for: {missing}"


@needs_promtool
def test_promtool_checks_the_rules() -> None:
    result = promtool("check", "rules", str(ALERTS))
    assert result.returncode == 0, result.stdout.decode() + result.stderr.decode()
    assert f"SUCCESS: {len(alert_rules())} rules found" in result.stdout.decode()


@needs_promtool
def test_promtool_checks_the_exposition() -> None:
    metrics = fresh_metrics()
    metrics.records_written.labels("inserted").inc(3)
    metrics.batch_write_seconds.observe(0.02)
    result = promtool("check", "metrics", stdin=generate_latest(metrics.registry))
    assert result.returncode == 0, result.stdout.decode() + result.stderr.decode()


# --- the alert rules, evaluated on synthetic series (promtool test rules) --------------------------------

def _series(name: str, values: str, **labels: str) -> dict[str, str]:
    extra = "".join(f', {k}="{v}"' for k, v in labels.items())
    return {"series": f"{name}{{{SERIES_LABELS}{extra}}}", "values": values}


def _expect(alert: str, at: str, *fired: dict[str, str]) -> dict:
    return {"eval_time": at, "alertname": alert, "exp_alerts": [{"exp_labels": labels} for labels in fired]}


def _e2e_histogram(seconds: float) -> list[dict[str, str]]:
    """Ten observations a minute, all of ``seconds``."""
    edges = [*(repr(float(b)) for b in E2E_BUCKETS), "+Inf"]
    name = "processor_end_to_end_seconds_bucket"
    return [_series(name, "0+10x30" if float(le) >= seconds else "0x30", le=le) for le in edges]


def _alert_cases() -> list[dict]:
    job = {"job": JOB}
    warning, critical = {"severity": "warning", **job}, {"severity": "critical", **job}
    critical_here = {**critical, "instance": "a:9464"}  # alerts that keep the instance label
    dead = "processor_records_dead_lettered_total"
    lag, written = "processor_stream_lag", "processor_records_written_total"
    return [
        {"name": "no writes while entries wait",
         "input_series": [_series(lag, "500x20"), _series(written, "1000x20", status="inserted"),
                          _series(written, "7x20", status="duplicate")],
         "alert_rule_test": [_expect("TelemetryProcessorNoWrites", "4m"),
                             _expect("TelemetryProcessorNoWrites", "12m", critical)]},
        {"name": "writing: no alert",
         "input_series": [_series(lag, "500x20"), _series(written, "0+100x20", status="inserted")],
         "alert_rule_test": [_expect("TelemetryProcessorNoWrites", "12m")]},
        {"name": "idle stream: no alert",
         "input_series": [_series(lag, "0x20"), _series(written, "1000x20", status="inserted")],
         "alert_rule_test": [_expect("TelemetryProcessorNoWrites", "12m")]},
        {"name": "lag growing past 1000",
         "input_series": [_series(lag, "2000+100x40")],
         "alert_rule_test": [_expect("TelemetryProcessorLagGrowing", "5m"),
                             _expect("TelemetryProcessorLagGrowing", "30m", warning)]},
        {"name": "lag high but flat",
         "input_series": [_series(lag, "5000x40")],
         "alert_rule_test": [_expect("TelemetryProcessorLagGrowing", "30m")]},
        {"name": "lag growing but small",
         "input_series": [_series(lag, "0+10x40")],
         "alert_rule_test": [_expect("TelemetryProcessorLagGrowing", "30m")]},
        {"name": "not ready for 2 minutes",
         "input_series": [_series("processor_ready", "1 1 0x10")],
         "alert_rule_test": [_expect("TelemetryProcessorNotReady", "3m"),
                             _expect("TelemetryProcessorNotReady", "6m", critical_here)]},
        {"name": "scrape down, only this job",
         "input_series": [_series("up", "1 0x10"),
                          {"series": 'up{job="other", instance="b:1"}', "values": "0x10"}],
         "alert_rule_test": [_expect("TelemetryProcessorDown", "6m", critical_here)]},
        {"name": "dead letters, by reason",
         "input_series": [_series(dead, "0 0 3 3 3 3", reason="invalid_json"),
                          _series(dead, "0x5", reason="too_large")],
         "alert_rule_test": [_expect("TelemetryProcessorDeadLetters", "3m",
                                     {**warning, "reason": "invalid_json"})]},
        {"name": "end-to-end p99 above 30 s",
         "input_series": _e2e_histogram(45.0),
         "alert_rule_test": [_expect("TelemetryProcessorEndToEndSlow", "12m", warning)]},
        {"name": "end-to-end p99 under a second",
         "input_series": _e2e_histogram(0.8),
         "alert_rule_test": [_expect("TelemetryProcessorEndToEndSlow", "12m")]},
        {"name": "PostgreSQL errors go on; a Redis blip is over",
         "input_series": [_series("processor_postgres_errors_total", "0+2x20"),
                          _series("processor_redis_errors_total", "0 5 5x18")],
         "alert_rule_test": [_expect("TelemetryProcessorPostgresErrors", "12m", warning),
                             _expect("TelemetryProcessorRedisErrors", "12m")]},
        {"name": "Redis errors go on",
         "input_series": [_series("processor_redis_errors_total", "0+1x20")],
         "alert_rule_test": [_expect("TelemetryProcessorRedisErrors", "12m", warning)]},
        {"name": "entries lost",
         "input_series": [_series("processor_entries_lost_total", "0 0 1 1 1")],
         "alert_rule_test": [_expect("TelemetryProcessorEntriesLost", "3m", critical)]},
    ]


@needs_promtool
def test_alerts_fire_on_the_right_series(tmp_path: Path) -> None:
    # Annotations are text, checked above; promtool would compare them too, so they are dropped here.
    rules = yaml.safe_load(ALERTS.read_text())
    stripped = copy.deepcopy(rules)
    for group in stripped["groups"]:
        for rule in group["rules"]:
            rule.pop("annotations", None)
    rules_file = tmp_path / "alerts.yml"
    rules_file.write_text(yaml.safe_dump(stripped))
    cases = _alert_cases()
    tests = [{"interval": "1m", "input_series": c["input_series"], "alert_rule_test": c["alert_rule_test"]}
             for c in cases]
    assert {t["alertname"] for c in cases for t in c["alert_rule_test"]} >= REQUIRED_ALERTS
    test_file = tmp_path / "alerts_test.yml"
    test_file.write_text(yaml.safe_dump({"rule_files": [str(rules_file)], "evaluation_interval": "1m",
                                         "tests": tests}))
    result = promtool("test", "rules", str(test_file))
    assert result.returncode == 0, result.stdout.decode() + result.stderr.decode()
