"""Usage alerts in a real browser: an admin reaches the alerts page from the usage page, the form
shows only the fields of the chosen kind and puts errors next to them, a breach shows as the
rule's last breach, and disabling a rule updates its row in place (htmx). Pages are saved at
1280 px and 390 px in tests/screenshots/."""

from __future__ import annotations

import pytest
from django.utils import timezone
from playwright.sync_api import expect

from tests.browser.conftest import in_thread, login, screenshot
from usage import alerts
from usage.models import AlertRule, Outcome, UsageEvent

pytestmark = pytest.mark.django_db(transaction=True)


def breach(people) -> int:
    UsageEvent.objects.bulk_create([
        UsageEvent(created_at=timezone.now(), user_id=people["bob"].pk, workspace_id=people["workspace"].pk,
                   method="tools/call", tool_name="t", request_id="r", latency_ms=1.0, outcome=Outcome.OK)
        for _ in range(4)
    ])
    return alerts.alerts_evaluate()


def test_an_admin_sets_a_rule_sees_its_breach_and_disables_it(page, people):
    login(page, "alice")
    page.goto("/usage/")
    page.get_by_role("link", name="Alerts").click()
    page.wait_for_url("**/usage/alerts/")
    expect(page.get_by_text("No alert rule yet.")).to_be_visible()
    page.get_by_role("link", name="New alert rule").first.click()
    page.wait_for_url("**/usage/alerts/new/")

    kind = page.get_by_label("Alert when")
    expect(page.get_by_label("Server")).to_be_hidden()
    kind.select_option("server_error_rate")
    expect(page.get_by_label("Server")).to_be_visible()
    expect(page.get_by_label("Member")).to_be_hidden()
    expect(page.get_by_label("Minimum requests in the hour")).to_be_visible()
    kind.select_option("member_daily_calls")
    expect(page.get_by_label("Member")).to_be_visible()
    page.get_by_label("Member").select_option(label="bob")
    page.get_by_role("button", name="Create rule").click()
    expect(page.locator("#id_threshold_error")).to_contain_text("A whole number from 1")
    screenshot(page, "usage-alert-form-error")
    page.get_by_label("Threshold").fill("3")
    page.get_by_role("button", name="Create rule").click()
    page.wait_for_url("**/usage/alerts/")
    row = page.locator("tr", has_text="bob makes more than 3 tool calls in a UTC day")
    expect(row.locator(".last-breach")).to_have_text("Never")

    assert in_thread(breach, people) == 1
    page.reload()
    expect(row.locator(".last-breach time")).to_be_visible()
    screenshot(page, "usage-alerts")

    row.get_by_role("button", name="Disable").click()
    expect(row.get_by_text("Disabled")).to_be_visible()
    expect(row.get_by_role("button", name="Enable")).to_be_focused()
    expect(page.locator("#alert-announce")).to_have_text(
        "Alert rule disabled: bob makes more than 3 tool calls in a UTC day.")
    assert not AlertRule.objects.get().enabled
