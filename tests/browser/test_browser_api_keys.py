"""The API keys page in a real browser: a created key is shown once and a reload neither shows it
again nor makes a second key; revoking asks first (Cancel keeps the key); the favicon loads."""

from __future__ import annotations

import re

import pytest

from tests.browser.conftest import login
from twinmcp.models import ApiKey

pytestmark = pytest.mark.django_db(transaction=True)


def test_create_reload_and_revoke_with_confirmation(page, people):
    from playwright.sync_api import expect

    alice = people["alice"]
    login(page, "alice")
    icon = page.locator('link[rel="icon"]').get_attribute("href")
    assert page.request.get(icon).headers["content-type"].startswith("image/svg+xml")
    ico = page.request.get("/favicon.ico")
    assert ico.ok and ico.headers["content-type"].startswith("image/svg+xml")

    page.get_by_role("link", name="API keys").click()
    page.get_by_label("Key name").fill("laptop")
    page.get_by_role("button", name="Create key").click()
    page.wait_for_url(re.compile(r"/api-keys/$"))
    key = page.locator("#new-key-value").inner_text()
    assert key.startswith("tmcp_")
    page.reload()
    expect(page.locator("#keys")).to_contain_text("laptop")
    assert page.locator("#new-key-value").count() == 0 and key not in page.content()
    assert ApiKey.objects.filter(user=alice, name="laptop").count() == 1

    page.get_by_role("link", name="Revoke laptop").click()
    expect(page.get_by_role("heading", name=re.compile("Revoke key"))).to_be_visible()
    page.get_by_role("link", name="Cancel").click()
    page.wait_for_url(re.compile(r"/api-keys/$"))
    assert ApiKey.objects.get(user=alice, name="laptop").revoked_at is None
    page.get_by_role("link", name="Revoke laptop").click()
    page.get_by_role("button", name="Revoke laptop").click()
    expect(page.locator(".messages")).to_contain_text("revoked;")
    assert ApiKey.objects.get(user=alice, name="laptop").revoked_at is not None
