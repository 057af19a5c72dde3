"""The operations assets in docs/ops: Prometheus alert rules (checked and unit-tested by promtool
through .ci/promtool.sh) and the Grafana dashboard. They may only use metrics the product exports."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
OPS = ROOT / "docs" / "ops"
RULES = OPS / "prometheus-alerts.yml"
DASHBOARD = OPS / "grafana-dashboard.json"
RUNBOOK = ROOT / "docs" / "runbook.md"

# What the product exports (external_mcp/metrics.py, external_mcp/health_metrics.py, usage/limiter.py,
# usage/export_metrics.py)
# plus django-prometheus's django_*.
EXPORTED_METRICS = {
    "external_mcp_availability",
    "external_mcp_servers",
    "external_mcp_health_last_check_timestamp_seconds",
    "external_mcp_health_next_check_timestamp_seconds",
    "external_mcp_latency_seconds_bucket",
    "external_mcp_latency_seconds_count",
    "external_mcp_latency_seconds_sum",
    "external_mcp_errors_total",
    "external_mcp_requests_total",
    "external_mcp_quota_rejections_total",
    "external_mcp_health_checks_total",
    "external_mcp_quota_unavailable_total",
    "external_mcp_quota_unavailable_active",
    "external_mcp_usage_export_lag_days",
    "external_mcp_usage_export_failing_days",
    "external_mcp_usage_export_failures_total",
    "external_mcp_usage_export_last_delivery_timestamp_seconds",
}
RUNBOOK_ANCHORS = {"external-server-down", "redis-down", "proxy-slow-or-failing", "quota-complaints",
                   "health-checks-stopped", "usage-export-behind"}
# alert -> (severity, `for`, runbook anchor)
EXPECTED_ALERTS = {
    "ExternalMCPHealthChecksFailing": ("critical", None, "external-server-down"),
    "ExternalMCPServerHealthChecksFailing": ("warning", None, "external-server-down"),
    "ExternalMCPServerDown": ("warning", "5m", "external-server-down"),
    "ExternalMCPProxyErrorRatioHigh": ("critical", "10m", "proxy-slow-or-failing"),
    "ExternalMCPProxyLatencyHigh": ("warning", "10m", "proxy-slow-or-failing"),
    "ExternalMCPQuotaUnavailable": ("warning", "1m", "redis-down"),
    "ExternalMCPHealthChecksStopped": ("critical", None, "health-checks-stopped"),
    "ExternalMCPUsageExportBehind": ("warning", "30m", "usage-export-behind"),
}
RUNBOOK_LINK = re.compile(r"docs/runbook\.md#([\w-]+)")

_PROMQL_WORDS = {
    "by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless", "offset",
    "inf", "nan",
}


def metric_names(expr: str) -> set[str]:
    """Metric names a PromQL expression selects (good enough for the expressions in docs/ops)."""
    e = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # string literals
    e = re.sub(r"\{[^}]*\}", "", e)  # label matchers (also Grafana's $server_id)
    e = re.sub(r"\[[^\]]*\]", "", e)  # range selectors (also $__rate_interval)
    e = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", e)  # label lists
    names = set()
    for match in re.finditer(r"(?<![\w.$])[A-Za-z_:][A-Za-z0-9_:]*", e):
        word = match.group(0)
        if e[match.end():].lstrip().startswith("(") or word.lower() in _PROMQL_WORDS:
            continue  # a function or aggregation call, or a keyword
        names.add(word)
    return names


def unknown_metrics(expr: str) -> set[str]:
    return {name for name in metric_names(expr) if name not in EXPORTED_METRICS and not name.startswith("django_")}


def test_metric_names_extraction():
    expr = ('histogram_quantile(0.95, sum by (le, server_id) (rate(external_mcp_latency_seconds_bucket'
            '{kind="proxy", server_id=~"$server_id"}[$__rate_interval]))) > 1e3 or vector(0) unless on (job) up')
    assert metric_names(expr) == {"external_mcp_latency_seconds_bucket", "up"}
    assert unknown_metrics(expr) == {"up"}


def test_exported_metrics_list_matches_the_product():
    """EXPORTED_METRICS is what the product's collectors really expose (catches a renamed metric)."""
    from prometheus_client.metrics import MetricWrapperBase

    import external_mcp.metrics
    import usage.limiter
    from external_mcp.health_metrics import HealthFactsCollector
    from usage.export_metrics import UsageExportCollector

    suffixes = {"counter": ["_total"], "gauge": [""], "histogram": ["_bucket", "_count", "_sum"]}
    exposed = set()
    collectors = [*vars(external_mcp.metrics).values(), *vars(usage.limiter).values(), HealthFactsCollector(),
                  UsageExportCollector()]
    for collector in collectors:
        if isinstance(collector, MetricWrapperBase | HealthFactsCollector | UsageExportCollector):
            for family in collector.describe():
                exposed.update(family.name + suffix for suffix in suffixes[family.type])
    assert exposed == EXPORTED_METRICS


@pytest.fixture(scope="module")
def promtool_run():
    """.ci/promtool.sh once per module: installs promtool if needed, checks and unit-tests the rules."""
    return subprocess.run(["bash", ".ci/promtool.sh"], cwd=ROOT, capture_output=True, text=True, timeout=900)


def test_promtool_checks_and_unit_tests_pass(promtool_run):
    output = promtool_run.stdout + promtool_run.stderr
    assert promtool_run.returncode == 0, output
    assert "SUCCESS" in output


@pytest.fixture(scope="module")
def rules():
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def test_every_expected_alert_is_defined(rules):
    alerts = {rule["alert"]: rule for rule in rules if "alert" in rule}
    assert set(alerts) == set(EXPECTED_ALERTS)
    for name, (severity, for_, anchor) in EXPECTED_ALERTS.items():
        rule = alerts[name]
        assert rule["labels"]["severity"] == severity, name
        assert rule.get("for") == for_, name
        annotations = rule["annotations"]
        assert annotations["summary"].strip() and annotations["description"].strip(), name
        assert annotations["runbook_url"] == f"docs/runbook.md#{anchor}", name


def test_runbook_links_use_known_anchors(rules):
    links = set()
    for rule in rules:
        for text in rule.get("annotations", {}).values():
            links.update(RUNBOOK_LINK.findall(text))
    assert links, "no runbook links in the alert annotations"
    assert links <= RUNBOOK_ANCHORS, links - RUNBOOK_ANCHORS


def _markdown_anchors(markdown: str) -> set[str]:
    anchors = set()
    for heading in re.findall(r"^#{1,6}\s+(.+?)\s*#*\s*$", markdown, flags=re.MULTILINE):
        slug = re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")
        anchors.add(slug)
    return anchors


def test_runbook_has_the_linked_sections():
    present = _markdown_anchors(RUNBOOK.read_text()) & RUNBOOK_ANCHORS
    assert present == RUNBOOK_ANCHORS, f"docs/runbook.md lacks sections: {sorted(RUNBOOK_ANCHORS - present)}"


def test_rules_use_only_exported_metrics(rules):
    for rule in rules:
        assert metric_names(rule["expr"]), rule["expr"]
        assert not unknown_metrics(rule["expr"]), (rule.get("alert"), unknown_metrics(rule["expr"]))


@pytest.fixture(scope="module")
def dashboard():
    return json.loads(DASHBOARD.read_text())


def _panels(dashboard):
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels", [])  # panels inside collapsed rows


def _exprs(dashboard):
    for panel in _panels(dashboard):
        for target in panel.get("targets", []):
            yield panel["title"], target["expr"]


def test_dashboard_is_importable(dashboard):
    assert dashboard["schemaVersion"] >= 36
    assert [i["name"] for i in dashboard["__inputs"]] == ["DS_PROMETHEUS"]
    panels = list(_panels(dashboard))
    ids = [panel["id"] for panel in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in panels:
        if panel["type"] == "row":
            continue
        assert panel["targets"], panel["title"]
        for datasource in [panel["datasource"], *(t["datasource"] for t in panel["targets"])]:
            assert datasource == {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}, panel["title"]


def test_dashboard_uses_only_exported_metrics(dashboard):
    used = set()
    for title, expr in _exprs(dashboard):
        assert not unknown_metrics(expr), (title, unknown_metrics(expr))
        used |= metric_names(expr)
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            metric = re.fullmatch(r"label_values\((\w+),\s*\w+\)", variable["definition"]).group(1)
            assert metric in EXPORTED_METRICS, variable["name"]
    # Every product metric has a panel (the latency histogram through its buckets).
    assert EXPORTED_METRICS - {"external_mcp_latency_seconds_count", "external_mcp_latency_seconds_sum"} <= used


def test_dashboard_queries_parse(dashboard, promtool_run, tmp_path):
    """Each panel query is valid PromQL: promtool parses them as recording rules."""
    promtool = shutil.which(os.environ.get("PROMTOOL", "promtool"))
    if promtool is None:
        pytest.fail("promtool is missing (see test_promtool_checks_and_unit_tests_pass)")
    records = []
    for i, (_title, expr) in enumerate(_exprs(dashboard)):
        expr = expr.replace("$__rate_interval", "5m").replace("$__range", "1h").replace("$server_id", ".*")
        records.append({"record": f"dashboard:query_{i}", "expr": expr})
    path = tmp_path / "dashboard-queries.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": records}]}))
    result = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
