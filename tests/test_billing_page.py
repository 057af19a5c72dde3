"""The plan page (/billing/): what free and paid users see, where "Upgrade" leads (the
TWINMCP_UPGRADE_URL setting and its check), and that every upgrade pointer — the quota banner and
the 429 agents get, absolute — lands on it."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import time_machine

from tests import mcp_peers
from tests.gateway import proxy_url, register
from tests.test_proxy import call, post
from twinmcp import checks, config
from twinmcp import services as core
from usage.limiter import get_limiter
from usage.templatetags.quota_time import time_until

ROOT = Path(__file__).resolve().parent.parent
NOW = datetime(2026, 11, 21, 18, 47, 30, tzinfo=UTC)


@pytest.fixture
def at_evening(settings):
    settings.EXTERNAL_MCP_FREE_DAILY_LIMIT = 10
    settings.TWINMCP_UPGRADE_URL = ""
    with time_machine.travel(NOW, tick=False):
        yield


def text(response) -> str:
    return " ".join(response.content.decode().split())


def test_login_required(client, db):
    response = client.get("/billing/")
    assert response.status_code == 302 and "/accounts/login/" in response["Location"]


def test_free_user_sees_use_remaining_reset_and_the_paid_plan(client, member, at_evening, settings):
    settings.REDIS_URL = ""  # the database counters: the page reads whichever the limiter uses
    get_limiter().consume(member.user.pk, 10, 4)
    client.force_login(member.user)
    page = text(client.get("/billing/"))
    assert "Free plan" in page and "Up to <strong>10</strong> tool calls per day" in page
    assert '<dd id="plan-used">4 of 10</dd>' in page and '<dd id="plan-remaining">6</dd>' in page
    assert "Sun 22 Nov, 00:00 UTC" in page and "(in 5 h 13 min)" in page
    assert "The Pro plan" in page and "Unlimited tool calls" in page
    assert 'id="upgrade-link"' not in page and "contact your workspace admin" in page


def test_upgrade_button_goes_to_the_configured_url(client, member, at_evening, settings):
    settings.TWINMCP_UPGRADE_URL = "https://billing.example/upgrade?plan=pro"
    client.force_login(member.user)
    page = client.get("/billing/").content.decode()
    assert 'id="upgrade-link" href="https://billing.example/upgrade?plan=pro"' in page
    assert "contact your workspace admin" not in page


def test_an_upgrade_url_pointing_back_here_shows_no_button(client, member, at_evening, settings):
    settings.TWINMCP_UPGRADE_URL = "/billing/"
    client.force_login(member.user)
    assert 'id="upgrade-link"' not in client.get("/billing/").content.decode()


def test_paid_user_sees_unlimited_and_no_upgrade(client, member, at_evening, settings):
    settings.TWINMCP_UPGRADE_URL = "https://billing.example/upgrade"
    core.profile_set_plan(user=member.user, code="pro")
    get_limiter().consume(member.user.pk, None, 42)
    client.force_login(member.user)
    page = text(client.get("/billing/"))
    assert "Pro plan" in page and '<dd id="plan-remaining">Unlimited</dd>' in page
    assert '<dd id="plan-used">42</dd>' in page
    assert 'id="plan-paid"' not in page and 'id="upgrade-link"' not in page


def test_the_banner_upgrade_link_leads_to_the_plan_page(admin_web, admin, at_evening):
    get_limiter().consume(admin.user.pk, 10, 10)
    page = admin_web.get("/servers/").content.decode()
    banner = page[page.index('id="quota-banner"'):]
    banner = banner[:banner.index("</div>")]
    assert '<a class="button small" href="/billing/">Upgrade for unlimited calls</a>' in banner
    assert admin_web.get("/billing/").status_code == 200


def test_time_until_reads_at_a_glance():
    now = datetime(2026, 1, 1, 18, 48, tzinfo=UTC)
    assert time_until(now + timedelta(hours=5, minutes=12), now) == "in 5 h 12 min"
    assert time_until(now + timedelta(hours=2), now) == "in 2 h"
    assert time_until(now + timedelta(seconds=20), now) == "in 1 min"
    assert time_until(now - timedelta(seconds=5), now) == "in 0 min"


# -- the setting ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["", "https://billing.example/upgrade", "http://10.0.0.1:8080/x", "/shop/pro/"])
def test_good_upgrade_urls_pass_the_check(settings, value):
    settings.TWINMCP_UPGRADE_URL = value
    assert checks.upgrade_url_check() == []


@pytest.mark.parametrize("value", ["javascript:alert(1)", "billing.example/upgrade", "//evil.example/x", "ftp://x/y",
                                   "https://"])
def test_bad_upgrade_urls_fail_the_named_check(settings, value):
    settings.TWINMCP_UPGRADE_URL = value
    [error] = checks.upgrade_url_check()
    assert error.id == "twinmcp.E020" and "TWINMCP_UPGRADE_URL=" in error.msg
    assert config.link_url_problem(value)


def test_a_bad_upgrade_url_in_the_environment_stops_start_up(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
    env.update(DEBUG="true", TWINMCP_VAR_DIR=str(tmp_path), TWINMCP_UPGRADE_URL="javascript:alert(1)")
    result = subprocess.run([sys.executable, "manage.py", "check"], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode != 0
    assert "TWINMCP_UPGRADE_URL=" in result.stderr and "absolute http(s) URL" in result.stderr
    assert "Traceback" not in result.stderr


# -- the 429 agents get ----------------------------------------------------------------------------------------


@pytest.mark.django_db(transaction=True)
@pytest.mark.usefixtures("midday", "proxy_settings")
def test_the_429_upgrade_url_is_absolute_and_opens_the_plan_page(admin, flag_on, gateway, settings, client):
    settings.EXTERNAL_MCP_FREE_DAILY_LIMIT = 1
    settings.TWINMCP_PUBLIC_URL = "https://twinmcp.example"
    settings.TWINMCP_UPGRADE_URL = "https://billing.example/upgrade"  # the page's button, not the agent's link
    with mcp_peers.stateless_peer() as peer:
        url = proxy_url(gateway, register(admin, peer))
        statuses = [asyncio.run(post(url, admin.raw_key, call("echo", {"text": "x"}, i))) for i in range(2)]
    assert [s[0] for s in statuses] == [200, 429]
    upgrade = json.loads(statuses[1][2])["error"]["data"]["upgrade_url"]
    assert upgrade == "https://twinmcp.example/billing/"
    client.force_login(admin.user)
    page = client.get(urlsplit(upgrade).path, HTTP_HOST="127.0.0.1")
    assert page.status_code == 200 and "Daily limit reached" in page.content.decode()
