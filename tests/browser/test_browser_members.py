"""The members page in a real browser: an admin adds an existing user, creates one (the generated
password is shown once), promotes and demotes, is refused demoting or removing the last admin, and
the table fits a phone. The audit log shows what happened. Saved at 1280 px and 390 px."""

from __future__ import annotations

import re

import pytest

from tests.browser.conftest import PHONE, login, screenshot
from twinmcp.models import Membership, Role

pytestmark = pytest.mark.django_db(transaction=True)


def test_admin_manages_members_and_cannot_drop_the_last_admin(page, people, django_user_model):
    from playwright.sync_api import expect

    workspace = people["workspace"]
    django_user_model.objects.create_user(username="dave", email="dave@example.com")
    login(page, "alice")
    page.get_by_role("link", name="Members").click()
    page.wait_for_url(re.compile(rf"/workspaces/{workspace.pk}/members/$"))
    messages = page.locator(".messages")

    page.get_by_label("Username or e-mail").fill("dave@example.com")
    page.get_by_role("button", name="Add member").click()
    messages.get_by_text("dave added to Acme as member.").wait_for()
    assert page.locator(f"#member-{Membership.objects.get(user__username='dave').user_id}").count() == 1

    page.get_by_label(re.compile(r"^Username\W*$")).fill("carol")
    page.get_by_role("button", name="Create user").click()
    messages.get_by_text("User carol created").wait_for()
    password = page.locator("#new-password-value").inner_text()
    assert django_user_model.objects.get(username="carol").check_password(password)

    page.get_by_label("Role of bob").select_option("admin")
    page.get_by_role("button", name="Change role of bob").click()
    messages.get_by_text("bob is now admin.").wait_for()
    assert page.locator("#new-password-value").count() == 0  # shown once
    page.get_by_label("Role of bob").select_option("member")
    page.get_by_role("button", name="Change role of bob").click()
    messages.get_by_text("bob is now member.").wait_for()

    page.get_by_label("Role of alice").select_option("member")
    page.get_by_role("button", name="Change role of alice").click()
    messages.get_by_text(re.compile("must keep at least one admin")).wait_for()
    page.get_by_role("link", name="Remove alice").click()
    page.get_by_role("button", name="Remove alice").click()
    messages.get_by_text(re.compile("must keep at least one admin")).wait_for()
    assert Membership.objects.get(user=people["alice"], workspace=workspace).role == Role.ADMIN
    screenshot(page, "members")

    page.set_viewport_size(PHONE)
    widths = page.evaluate("""() => ({page: document.documentElement.scrollWidth,
                                      table: document.querySelector('#members').getBoundingClientRect().right})""")
    assert widths["page"] <= PHONE["width"] and widths["table"] <= PHONE["width"], widths

    page.get_by_role("link", name="Audit log").first.click()
    page.wait_for_url("**/audit/")
    page.get_by_label("Action").select_option("member.role")  # htmx swaps the table and pushes the URL
    expect(page.locator("#audit-events tbody tr")).to_have_count(2)
    page.wait_for_url(re.compile(r"action=member\.role"))
    expect(page.locator("#events-title")).to_have_text("2 events")
    screenshot(page, "audit-log")
