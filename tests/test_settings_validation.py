"""Bad configuration stops start-up with a message naming the variable (real processes)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
GOOD_KEY = "q4tv2Q6o2m0Ezn1lGkC2QhKqFhU5f8cWj1cQmX0m2Jw="


@pytest.fixture(autouse=True)
def _own_var_dir(tmp_path, monkeypatch):
    """The processes' SQLite fallback and files go to this test's directory, shared with no other run."""
    monkeypatch.setenv("TWINMCP_VAR_DIR", str(tmp_path))


def run_check(**env: str) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if k not in {"DATABASE_URL"}}
    base.update({"DEBUG": "true"})
    base.update(env)
    return subprocess.run(
        [sys.executable, "manage.py", "check"], cwd=ROOT, env=base, capture_output=True, text=True, timeout=60
    )


@pytest.mark.parametrize(
    ("name", "value", "expected"),
    [
        ("EXTERNAL_MCP_FREE_DAILY_LIMIT", "abc", "expected a whole number"),
        ("EXTERNAL_MCP_FREE_DAILY_LIMIT", "-5", "expected a number >= 0"),
        ("EXTERNAL_MCP_ALLOWED_PROTOCOLS", "ftp", "unsupported protocol ftp"),
        ("EXTERNAL_MCP_ALLOWED_NETWORKS", "10.0.0.0/33", "not a CIDR network"),
        ("TWINMCP_PUBLIC_URL", "twinmcp.example.com", "expected an absolute http(s) URL"),
        ("TWINMCP_PUBLIC_URL", "https://twinmcp.example.com/?x=1", "without query or fragment"),
        ("TWINMCP_ENCRYPTION_KEYS", "c2hvcnQ=", "must decode to 32 bytes"),
        ("TWINMCP_ENCRYPTION_KEYS", "not a key", "not valid URL-safe base64"),
        ("TWINMCP_ENCRYPTION_KEYS", f"{GOOD_KEY},%%%", "not valid URL-safe base64"),
        ("EXTERNAL_MCP_PROXY_TIMEOUT_MS", "30s", "expected a whole number"),
        ("EXTERNAL_MCP_TOOL_NAME_MAX_CHARS", "200", "expected a number <= 128"),
        ("EXTERNAL_MCP_TOOL_NAME_MAX_CHARS", "20", "expected a number >= 40"),
        ("DEBUG", "maybe", "expected true or false"),
    ],
)
def test_bad_value_stops_check_naming_the_variable(name, value, expected):
    result = run_check(**{name: value})
    assert result.returncode != 0
    assert f"{name}=" in result.stderr
    assert expected in result.stderr
    assert "Traceback" not in result.stderr


def test_a_bad_encryption_key_is_never_echoed():
    result = run_check(TWINMCP_ENCRYPTION_KEYS=f"{GOOD_KEY},c2hvcnQ=")
    assert "key 2: a key must decode to 32 bytes" in result.stderr
    assert GOOD_KEY not in result.stderr and "c2hvcnQ" not in result.stderr


def test_production_requires_secret_and_keys():
    result = run_check(DEBUG="false", SECRET_KEY="", TWINMCP_ENCRYPTION_KEYS="")
    assert result.returncode != 0
    assert "SECRET_KEY is required" in result.stderr
    assert "TWINMCP_ENCRYPTION_KEYS is required" in result.stderr


def test_good_configuration_passes():
    result = run_check(
        EXTERNAL_MCP_FREE_DAILY_LIMIT="50",
        EXTERNAL_MCP_ALLOWED_PROTOCOLS="https,http",
        TWINMCP_ENCRYPTION_KEYS=GOOD_KEY,
    )
    assert result.returncode == 0, result.stderr


def test_asgi_start_up_refuses_bad_config():
    env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
    env.update({"DEBUG": "true", "EXTERNAL_MCP_FREE_DAILY_LIMIT": "abc"})
    result = subprocess.run(
        [sys.executable, "-c", "import twinmcp.asgi"], cwd=ROOT, env=env, capture_output=True, text=True,
        timeout=60,
    )
    assert result.returncode != 0
    assert "ImproperlyConfigured: EXTERNAL_MCP_FREE_DAILY_LIMIT='abc' is invalid" in result.stderr


def test_defaults_match_the_story(settings):
    assert settings.EXTERNAL_MCP_PROXY_TIMEOUT_MS == 30000
    assert settings.EXTERNAL_MCP_MAX_PER_ORG == 20
    assert settings.EXTERNAL_MCP_USAGE_RETENTION_DAYS == 90
    assert settings.EXTERNAL_MCP_FREE_DAILY_LIMIT == 200
