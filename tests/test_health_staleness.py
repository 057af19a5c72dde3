"""Health status that cannot lie: when checks stop (beat or workers down), a server's last verdict
is shown as stale in the list, the page, the API and /metrics — derived when read from the stored
last check, the server's interval and the sweep period, not from a status someone must update."""

from __future__ import annotations

from datetime import timedelta

import pytest
import time_machine
from django.test import Client
from django.utils import timezone
from prometheus_client.parser import text_string_to_metric_families

from external_mcp import health, services, staleness
from external_mcp.mcp_client import CheckResult
from external_mcp.models import ExternalMcpServer

OK = CheckResult(ok=True, protocol_version="2025-11-25", era="handshake", total_ms=12,
                 tools=[{"name": "echo", "inputSchema": {"type": "object"}}])
FAIL = CheckResult(ok=False, error_class="connect", error_message="Cannot connect.", total_ms=3)
API = "/api/v1/external-mcp/servers/"


@pytest.fixture(autouse=True)
def _timing(settings):
    settings.EXTERNAL_MCP_HEALTH_STALE_INTERVALS = 3
    settings.EXTERNAL_MCP_HEALTH_SWEEP_SECONDS = 15
    settings.EXTERNAL_MCP_HEALTH_TIMEOUT_MS = 10_000
    settings.METRICS_BEARER_TOKEN = ""
    settings.METRICS_ALLOWED_NETWORKS = ["127.0.0.0/8"]


# 3 intervals of 60 s + one 15 s sweep + the 10 s check timeout.
GRACE = timedelta(seconds=3 * 60 + 15 + 10)


def make(admin, name: str, **kwargs) -> ExternalMcpServer:
    return services.server_create(workspace=admin.workspace, actor=admin.user, name=name,
                                  base_url="https://93.184.215.14/mcp", **kwargs)


def checked(admin, name: str, result: CheckResult = OK, at=None, **kwargs) -> ExternalMcpServer:
    server = make(admin, name, **kwargs)
    return health.record_check(server=server, result=result, now=at or timezone.now())


def samples(text: str, name: str) -> dict[tuple, float]:
    """The samples of one metric family in a /metrics page: {label values: value}."""
    return {tuple(sorted(sample.labels.items())): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples if sample.name == name}


def api_status(client, server) -> dict:
    return client.get(f"{API}{server.pk}/").json()


def test_a_server_whose_checks_stopped_shows_stale_in_the_api(admin, member, flag_on):
    t0 = timezone.now()
    server = checked(admin, "s1", at=t0)
    with time_machine.travel(t0 + GRACE - timedelta(seconds=1), tick=False):
        body = api_status(member.client(), server)
        assert (body["status"], body["recorded_status"], body["stale"]) == ("healthy", "healthy", False)
    with time_machine.travel(t0 + GRACE + timedelta(seconds=1), tick=False):
        body = api_status(member.client(), server)
        assert (body["status"], body["recorded_status"], body["stale"]) == ("stale", "healthy", True)
        assert body["stale_since"].startswith((t0 + GRACE).strftime("%Y-%m-%dT%H:%M:%S"))
        [listed] = member.client().get(API).json()["results"]
        assert listed["status"] == "stale"


def test_a_new_check_makes_the_server_fresh_again(admin, member, flag_on):
    t0 = timezone.now()
    server = checked(admin, "s1", at=t0)
    later = t0 + GRACE * 2
    with time_machine.travel(later):
        assert api_status(member.client(), server)["status"] == "stale"
        health.record_check(server=ExternalMcpServer.objects.get(pk=server.pk), result=FAIL, now=later)
        assert api_status(member.client(), server)["status"] == "warning"


def test_a_never_checked_server_is_stale_after_the_grace_from_its_registration(admin, member, flag_on):
    t0 = timezone.now()
    with time_machine.travel(t0):
        server = make(admin, "never")
    with time_machine.travel(t0 + GRACE - timedelta(seconds=1), tick=False):
        assert api_status(member.client(), server)["status"] == "new"
    with time_machine.travel(t0 + GRACE + timedelta(seconds=1), tick=False):
        assert api_status(member.client(), server)["status"] == "stale"


def test_the_grace_follows_the_servers_own_interval(admin, member, flag_on):
    t0 = timezone.now()
    hourly = checked(admin, "hourly", at=t0, check_interval_seconds=3600)
    with time_machine.travel(t0 + timedelta(hours=2)):
        assert api_status(member.client(), hourly)["status"] == "healthy"
    with time_machine.travel(t0 + timedelta(hours=3, seconds=26)):
        assert api_status(member.client(), hourly)["status"] == "stale"


def test_disabled_servers_are_never_stale(admin, member, flag_on):
    t0 = timezone.now()
    server = checked(admin, "off", at=t0)
    services.server_update(server=server, actor=admin.user, enabled=False)
    with time_machine.travel(t0 + timedelta(days=2)):
        body = api_status(member.client(), server)
        assert (body["status"], body["stale"], body["stale_since"]) == ("disabled", False, None)


def test_the_status_filter_uses_the_shown_status(admin, member, flag_on):
    t0 = timezone.now()
    checked(admin, "old", at=t0)
    with time_machine.travel(t0 + GRACE * 2):
        checked(admin, "fresh", at=timezone.now())
        client = member.client()
        assert [s["name"] for s in client.get(API, {"status": "stale"}).json()["results"]] == ["old"]
        assert [s["name"] for s in client.get(API, {"status": "healthy"}).json()["results"]] == ["fresh"]


def test_the_list_and_the_page_show_stale_with_the_last_verdict(admin, admin_web):
    t0 = timezone.now()
    old = checked(admin, "old-srv", at=t0)
    checked(admin, "down-srv", result=FAIL, at=t0)
    for _ in range(2):
        health.record_check(server=ExternalMcpServer.objects.get(name="down-srv"), result=FAIL, now=t0)
    with time_machine.travel(t0 + GRACE * 2):
        checked(admin, "fresh-srv", at=timezone.now())
        page = admin_web.get("/servers/").content.decode()
        row = page[page.index('data-server-name="old-srv"'):]
        assert 'data-status="stale"' in row[:row.index("</tr>")]
        # Stale sorts right after down: what nobody checks any more is what an admin must see.
        assert page.index("down-srv") < page.index("old-srv") < page.index("fresh-srv")
        assert 'data-status="stale"' in admin_web.get("/servers/?status=stale").content.decode()
        detail = admin_web.get(f"/servers/{old.pk}/").content.decode()
    assert 'data-status="stale"' in detail
    assert "Last recorded status" in detail and "Healthy" in detail
    assert "health checks may have stopped" in detail


def test_metrics_show_stale_servers_and_the_last_check_time_from_the_database(admin):
    t0 = timezone.now().replace(microsecond=0)
    checked(admin, "old", at=t0 - GRACE * 2)
    fresh = checked(admin, "srv-checked-now", at=t0)
    make(admin, "off", enabled=False)
    with time_machine.travel(t0 + timedelta(seconds=5)):
        text = Client().get("/metrics").content.decode()
    servers = samples(text, "external_mcp_servers")
    assert servers[(("status", "stale"),)] == 1 and servers[(("status", "healthy"),)] == 1
    assert servers[(("status", "disabled"),)] == 1 and servers[(("status", "down"),)] == 0
    # The stale server's availability is unknown: no value rather than its last "healthy".
    assert samples(text, "external_mcp_availability") == {(("server_id", str(fresh.pk)),): 1.0}
    assert samples(text, "external_mcp_health_last_check_timestamp_seconds") == {(): t0.timestamp()}


def test_the_last_check_metric_is_computed_when_scraped_even_if_nothing_runs(admin):
    t0 = timezone.now().replace(microsecond=0)
    checked(admin, "one", at=t0)
    ExternalMcpServer.objects.update(next_check_at=t0 + timedelta(seconds=60))
    for minutes in (1, 10):
        with time_machine.travel(t0 + timedelta(minutes=minutes)):
            text = Client().get("/metrics").content.decode()
        assert samples(text, "external_mcp_health_last_check_timestamp_seconds") == {(): t0.timestamp()}
        due = t0 + timedelta(seconds=60)
        assert samples(text, "external_mcp_health_next_check_timestamp_seconds") == {(): due.timestamp()}


def test_python_and_sql_agree_on_staleness(admin):
    t0 = timezone.now()
    servers = [checked(admin, f"s{i}", at=t0 - timedelta(seconds=s), check_interval_seconds=iv)
               for i, (s, iv) in enumerate([(10, 60), (300, 60), (300, 600), (2000, 600), (90000, 86400)])]
    servers.append(make(admin, "never"))
    now = t0 + timedelta(seconds=1)
    by_sql = dict(ExternalMcpServer.objects.with_shown_status(now).values_list("name", "shown_status"))
    by_python = {s.name: staleness.shown_status(ExternalMcpServer.objects.get(pk=s.pk), now) for s in servers}
    assert by_sql == by_python
    assert sorted(n for n, status in by_sql.items() if status == "stale") == ["s1", "s3"]


def test_the_django_admin_filters_and_shows_the_derived_status(admin, admin_client):
    t0 = timezone.now()
    stopped = checked(admin, "srv-checks-stopped", at=t0 - GRACE - timedelta(seconds=1))
    fresh = checked(admin, "srv-checked-now", at=t0)
    with time_machine.travel(t0, tick=False):
        stale_page = admin_client.get("/admin/external_mcp/externalmcpserver/?status=stale").content.decode()
        healthy_page = admin_client.get("/admin/external_mcp/externalmcpserver/?status=healthy").content.decode()
    assert stopped.name in stale_page and fresh.name not in stale_page
    assert 'class="field-shown_status">Stale (no recent check)<' in stale_page  # the row, not the filter
    assert fresh.name in healthy_page and stopped.name not in healthy_page
