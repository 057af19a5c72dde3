"""The server page refreshes itself: one poll brings the summary, the cards (history, errors, chart)
when a check or a status change was recorded since the page's version, and the bell; elsewhere the
bell polls by itself."""

from __future__ import annotations

import re
from html import unescape

import pytest

from external_mcp import health, mcp_client
from external_mcp.choices import NotificationKind
from external_mcp.models import HealthCheck, Notification, StatusChange
from external_mcp.notifications import notify_admins
from tests.test_ui_views import html, make_server


def version_of(page: str) -> str:
    match = re.search(r'id="live-version" name="v" value="([^"]*)"', page)
    assert match, "no live version in the page"
    return unescape(match.group(1))


def poll(client, server, version: str = ""):
    return client.get(f"/servers/{server.pk}/", {"v": version}, HTTP_HX_REQUEST="true")


def test_the_page_polls_with_its_version_and_the_bell_follows_the_page_poll(admin_web, admin, settings):
    settings.TWINMCP_UI_POLL_SECONDS = 7
    server = make_server(admin)
    page = html(admin_web.get(f"/servers/{server.pk}/"))
    assert 'hx-include="#live-version"' in page and 'data-poll-interval="7000"' in page
    assert version_of(page)
    bell = re.search(r'<a id="bell"[^>]*>', page).group(0)
    assert "hx-get" not in bell  # the page's own poll refreshes it


def test_a_recorded_check_brings_the_cards_back_out_of_band(admin_web, admin):
    server = make_server(admin)
    version = version_of(html(admin_web.get(f"/servers/{server.pk}/")))

    quiet = html(poll(admin_web, server, version))
    assert "Endpoint" in quiet and "<html" not in quiet
    assert 'id="history-body"' not in quiet and 'id="latency-body"' not in quiet
    assert 'id="bell" class="bell" href="/notifications/" hx-swap-oob="true"' in quiet

    server.refresh_from_db()
    failed = mcp_client.CheckResult(ok=False, error_class="connect", error_message="connection refused by <peer>",
                                    total_ms=5)
    server = health.record_check(server=server, result=failed)
    server = health.record_check(server=server, result=mcp_client.CheckResult(ok=True, total_ms=42))
    changed = html(poll(admin_web, server, version))
    assert 'id="latency-body" hx-swap-oob="true"' in changed and "1 failed" in changed
    assert 'id="errors-body" hx-swap-oob="true"' in changed and "connection refused by &lt;peer&gt;" in changed
    assert 'id="history-body" hx-swap-oob="true"' in changed
    assert StatusChange.objects.filter(server=server).exists()
    new_version = version_of(changed)
    assert new_version != version
    assert 'id="history-body"' not in html(poll(admin_web, server, new_version))


def test_the_poll_costs_a_bounded_number_of_queries(admin_web, admin, django_assert_max_num_queries):
    server = make_server(admin)
    for i in range(30):
        HealthCheck.objects.create(server=server, ok=bool(i % 2), latency_ms=i, error_class="", error_message="x")
    poll(admin_web, server)
    with django_assert_max_num_queries(14):
        poll(admin_web, server)


def test_the_bell_polls_by_itself_on_other_pages_and_counts_unread(admin_web, admin, settings):
    settings.TWINMCP_UI_POLL_SECONDS = 5
    bell = re.search(r'<a id="bell"[^>]*>', html(admin_web.get("/servers/"))).group(0)
    assert 'hx-get="/notifications/bell/"' in bell and 'data-poll-interval="5000"' in bell
    assert "0 unread" in html(admin_web.get("/notifications/bell/"))
    notify_admins(workspace_id=admin.workspace.pk, kind=NotificationKind.WARNING, title="t", body="b",
                  dedup_key="live-test")
    answer = html(admin_web.get("/notifications/bell/"))
    assert "1 unread" in answer and 'class="count"' in answer and "<html" not in answer


def test_the_bell_counts_only_the_callers_notifications(member_web, admin, member):
    notify_admins(workspace_id=admin.workspace.pk, kind=NotificationKind.WARNING, title="t", body="b",
                  dedup_key="admins-only")
    assert Notification.objects.filter(user=admin.user).count() == 1
    assert "0 unread" in html(member_web.get("/notifications/bell/"))


def test_outsider_polls_nothing_and_anonymous_is_sent_to_login(outsider_web, admin, client):
    server = make_server(admin)
    assert poll(outsider_web, server).status_code == 404
    outsider_web.logout()
    response = outsider_web.get("/notifications/bell/")
    assert response.status_code == 302 and response["Location"].startswith("/accounts/login/")


@pytest.mark.parametrize("role", ["member"])
def test_a_member_sees_the_live_cards_too(member_web, admin, role):
    server = make_server(admin)
    HealthCheck.objects.create(server=server, ok=False, error_class="timeout", error_message="slow peer")
    assert "slow peer" in html(poll(member_web, server))
