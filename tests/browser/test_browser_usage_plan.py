"""Browser flows of the plan page, the quota page and the usage page's drill-down and API errors
(Playwright + Chromium against the live server; see conftest.py)."""

from __future__ import annotations

import re

import pytest
from django.utils import timezone

from external_mcp.models import ExternalMcpServer
from tests.browser.conftest import DESKTOP, PHONE, login, screenshot
from twinmcp import services
from usage.limiter import get_limiter
from usage.models import UsageEvent

pytestmark = pytest.mark.django_db(transaction=True)


def fits_the_viewport(page) -> bool:
    return page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")


def test_plan_page_at_desktop_and_phone_sizes_with_its_upgrade_link(page, people, settings, midday):
    from playwright.sync_api import expect

    settings.EXTERNAL_MCP_FREE_DAILY_LIMIT = 5
    settings.TWINMCP_UPGRADE_URL = "https://billing.example/upgrade"
    get_limiter().consume(people["bob"].pk, 5, 5)
    login(page, "bob")
    # The banner's upgrade link leads to the plan page, whatever the checkout URL is.
    page.locator("#quota-banner").get_by_role("link", name="Upgrade for unlimited calls").click()
    page.wait_for_url(re.compile(r"/billing/$"))
    expect(page.get_by_role("heading", name="Free plan")).to_be_visible()
    expect(page.locator("#plan-used")).to_have_text("5 of 5")
    expect(page.locator("#plan-remaining")).to_have_text("0")
    expect(page.locator("#plan-reset")).to_contain_text(re.compile(r"00:00 UTC\s+\(in \d+ h( \d+ min)?\)"))
    for size in (DESKTOP, PHONE):
        page.set_viewport_size(size)
        upgrade = page.get_by_role("link", name="Upgrade to Pro")
        expect(upgrade).to_be_visible()
        expect(upgrade).to_have_attribute("href", "https://billing.example/upgrade")
        assert fits_the_viewport(page), size
    screenshot(page, "billing")

    settings.TWINMCP_UPGRADE_URL = ""
    page.reload()
    expect(page.get_by_text("contact your workspace admin")).to_be_visible()
    expect(page.get_by_role("link", name="Upgrade to Pro")).to_have_count(0)


def test_quota_page_lists_members_and_links_to_their_usage(page, people, settings, midday):
    from playwright.sync_api import expect

    settings.EXTERNAL_MCP_FREE_DAILY_LIMIT = 5
    bob = people["bob"]
    services.profile_set_plan(user=people["alice"], code="pro")
    server = ExternalMcpServer.objects.create(workspace=people["workspace"], name="crm",
                                              base_url="https://93.184.215.14/mcp")
    get_limiter().consume(bob.pk, 5, 3)
    now = timezone.now()
    UsageEvent.objects.bulk_create([
        UsageEvent(created_at=now, user=bob, workspace=people["workspace"], server=server, method="tools/call",
                   tool_name="search", request_id=f"r{i}", latency_ms=5, outcome="quota" if i < 2 else "ok",
                   counted=i >= 2)
        for i in range(5)
    ])
    login(page, "alice")
    page.get_by_role("link", name="Quota", exact=True).click()
    page.wait_for_url(re.compile(r"/usage/quota/$"))
    row = page.locator(f'#quota-members tr[data-user-id="{bob.pk}"]')
    expect(row).to_contain_text("3 / 5")
    expect(row.locator('td[data-label="Remaining"]')).to_have_text("2")
    expect(row.locator('td[data-label="Refused in period"]')).to_have_text("2")
    expect(page.locator(f'#quota-members tr[data-user-id="{people["alice"].pk}"]')).to_contain_text("Unlimited")
    for size in (DESKTOP, PHONE):
        page.set_viewport_size(size)
        assert fits_the_viewport(page), size
    screenshot(page, "quota")
    page.set_viewport_size(DESKTOP)

    row.get_by_role("link", name="Usage of bob").click()
    page.wait_for_url(re.compile(rf"/usage/\?.*user={bob.pk}"))
    page.wait_for_selector('#usage-dashboard[data-loaded="true"]')
    expect(page.locator('[data-total="outcome-quota"]')).to_have_text("2")
    expect(page.locator('[data-total="outcome-ok"]')).to_have_text("3")
    expect(page.locator("#id_user")).to_have_value(str(bob.pk))


def test_usage_rows_drill_down_and_the_back_button_undoes_it(page, people, midday):
    from playwright.sync_api import expect

    server = ExternalMcpServer.objects.create(workspace=people["workspace"], name="crm",
                                              base_url="https://93.184.215.14/mcp")
    now = timezone.now()
    UsageEvent.objects.bulk_create([
        UsageEvent(created_at=now, user=people[name], workspace=people["workspace"], server=server,
                   method="tools/call", tool_name=tool, request_id=f"{name}{i}", latency_ms=5,
                   outcome=outcome, counted=outcome == "ok")
        for name, tool, outcome, n in (("alice", "search", "ok", 2), ("bob", "fetch", "timeout", 3),
                                       ("bob", "search", "blocked", 1))
        for i in range(n)
    ])
    login(page, "alice")
    page.goto("/usage/?group_by=user")
    page.wait_for_selector('#usage-dashboard[data-loaded="true"]')
    page.get_by_role("link", name="Filter usage to user bob").click()
    page.wait_for_url(re.compile(r"group_by=tool"))
    page.wait_for_selector('#usage-dashboard[data-loaded="true"]')
    expect(page.locator("#id_user")).to_have_value(str(people["bob"].pk))
    expect(page.locator('[data-total="requests"]')).to_have_text("4")
    table = page.locator("#usage-table tbody")
    expect(table.locator("tr")).to_have_count(2)
    fetch = table.locator("tr", has_text="fetch")
    expect(fetch.locator('td[data-label="Upstream timeout"]')).to_have_text("3")
    expect(table.locator("tr", has_text="search").locator('td[data-label="Blocked by governance"]')).to_have_text("1")
    page.go_back()
    page.wait_for_url(re.compile(r"/usage/\?group_by=user$"))
    page.wait_for_selector('#usage-dashboard[data-loaded="true"]')
    expect(page.locator("#id_user")).to_have_value("")
    expect(page.locator('[data-total="requests"]')).to_have_text("6")


def test_usage_errors_show_the_apis_message_and_retry_only_for_server_failures(page, people):
    from playwright.sync_api import expect

    login(page, "alice")
    page.goto("/usage/?start=2025-01-01&end=2026-01-02")  # 367 days
    page.wait_for_selector('#usage-dashboard[data-loaded="error"]')
    status = page.locator("#usage-status")
    expect(status).to_contain_text("Usage data could not be loaded: start: The range 2025-01-01..2026-01-02 spans "
                                   "367 days; at most 366 are allowed.")
    expect(status).not_to_contain_text("Try again")

    page.route(re.compile(r"/api/v1/external-mcp/usage\?"),
               lambda route: route.fulfill(status=503, content_type="application/json",
                                           body='{"detail": "Service unavailable."}'))
    page.goto("/usage/")
    page.wait_for_selector('#usage-dashboard[data-loaded="error"]')
    expect(status).to_have_text("Usage data could not be loaded (HTTP 503). Try again in a moment.")
