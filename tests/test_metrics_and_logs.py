from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest
from django.test import Client

from external_mcp import health, services
from external_mcp.mcp_client import CheckResult
from twinmcp.jsonlog import JsonFormatter, redact

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def locked_metrics(settings):
    settings.METRICS_BEARER_TOKEN = "metrics-token-123"
    settings.METRICS_ALLOWED_NETWORKS = []


def test_metrics_need_the_token_or_an_allowed_network(db, locked_metrics, settings):
    assert Client().get("/metrics").status_code == 401
    assert Client().get("/metrics", HTTP_AUTHORIZATION="Bearer wrong").status_code == 401
    response = Client().get("/metrics", HTTP_AUTHORIZATION="Bearer metrics-token-123")
    assert response.status_code == 200
    settings.METRICS_BEARER_TOKEN = ""
    settings.METRICS_ALLOWED_NETWORKS = ["127.0.0.0/8"]
    assert Client().get("/metrics").status_code == 200


def test_the_story_metrics_have_values_after_a_check(admin, locked_metrics):
    server = services.server_create(workspace=admin.workspace, actor=admin.user, name="m",
                                    base_url="https://93.184.215.14/mcp")
    health.record_check(server=server, result=CheckResult(ok=False, error_class="connect", error_message="x"))
    text = Client().get("/metrics", HTTP_AUTHORIZATION="Bearer metrics-token-123").content.decode()
    sid = str(server.pk)
    assert f'external_mcp_availability{{server_id="{sid}"}} 0.5' in text
    assert f'external_mcp_health_checks_total{{result="failure",server_id="{sid}"}}' in text
    assert f'external_mcp_errors_total{{error_class="connect",kind="health",server_id="{sid}"}}' in text
    assert "external_mcp_latency_seconds_bucket" in text
    assert "external_mcp_requests_total" in text and "external_mcp_quota_rejections_total" in text
    assert "django_http_requests_total_by_method_total" in text
    assert "93.184.215.14" not in text  # server ids, never URLs


def test_multiprocess_mode_sums_every_process(db, locked_metrics, tmp_path, monkeypatch):
    code = ("from external_mcp.metrics import HEALTH_CHECKS; "
            "HEALTH_CHECKS.labels('s1', 'ok').inc(3)")
    for _ in range(2):
        subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=60,
                       env={"PROMETHEUS_MULTIPROC_DIR": str(tmp_path), "PATH": "/usr/bin:/bin"})
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    text = Client().get("/metrics", HTTP_AUTHORIZATION="Bearer metrics-token-123").content.decode()
    assert 'external_mcp_health_checks_total{result="ok",server_id="s1"} 6.0' in text


def test_request_id_is_echoed_and_generated(db):
    assert Client().get("/healthz", HTTP_X_REQUEST_ID="abc-123")["X-Request-Id"] == "abc-123"
    generated = Client().get("/healthz", HTTP_X_REQUEST_ID="bad id with spaces")["X-Request-Id"]
    assert len(generated) == 32 and " " not in generated


def test_json_lines_carry_correlation_fields_and_never_secrets():
    record = logging.LogRecord("external_mcp.proxy", logging.INFO, __file__, 1,
                               "called with Bearer tmcp_abcdefghijklmnopqrstuvwxyz0123456789ABCDEFG", None, None)
    record.request_id, record.server, record.outcome, record.latency_ms = "r1", "s1", "ok", 1.5
    line = json.loads(JsonFormatter().format(record))
    assert line["request_id"] == "r1" and line["server"] == "s1" and line["latency_ms"] == 1.5
    assert "tmcp_abc" not in line["message"] and "[redacted]" in line["message"]
    pem = "-----BEGIN PRIVATE KEY-----\nMIIE\n-----END PRIVATE KEY-----"
    assert redact(f"key {pem} and Basic dXNlcjpwYXNzd29yZA==") == "key [redacted] and [redacted]"
