"""The add form in a real browser: "Test connection" before saving (a wrong URL fails and creates
nothing, the fixed URL lists the tools, then saving creates the server, all without leaving the
page), and a 100-character unbroken server name staying inside its card at 1280 and 390 px."""

from __future__ import annotations

from contextlib import closing

import pytest
from playwright.sync_api import expect

from external_mcp import services
from external_mcp.models import ExternalMcpServer
from tests import mcp_peers
from tests.browser.conftest import DESKTOP, PHONE, login, screenshot

pytestmark = pytest.mark.django_db(transaction=True)

LONG_NAME = "x" * 100


def test_test_before_save_then_save(page, people):
    login(page, "alice")
    page.goto("/servers/new/")
    page.evaluate("window.__sameDocument = true")  # gone if the page reloads
    sock = mcp_peers.reserve_port()
    with closing(sock), mcp_peers.default_peer() as peer:
        page.get_by_label("Name").fill("Trial upstream")
        page.get_by_label("MCP endpoint URL").fill(f"http://127.0.0.1:{sock.getsockname()[1]}/mcp")
        page.get_by_role("button", name="Test connection").click()
        outcome = page.locator("#trial-outcome")
        expect(outcome).to_have_attribute("data-ok", "false")
        expect(outcome).to_contain_text("Connection refused")
        expect(page.locator("#save-warning")).to_contain_text("The last test failed: Connection refused")
        screenshot(page, "server-add-test-failed")
        assert ExternalMcpServer.objects.count() == 0

        page.get_by_label("MCP endpoint URL").fill(peer.url)
        page.get_by_role("button", name="Test connection").click()
        expect(outcome).to_have_attribute("data-ok", "true")
        expect(page.locator(".trial-tool-list")).to_contain_text("echo")
        expect(page.locator("#save-warning")).to_be_hidden()
        screenshot(page, "server-add-test-ok")
        assert page.evaluate("window.__sameDocument === true")
        assert page.get_by_label("Name").input_value() == "Trial upstream"
        assert ExternalMcpServer.objects.count() == 0

        page.get_by_role("button", name="Save and continue").click()
        page.wait_for_url("**/edit/#tests")
    assert ExternalMcpServer.objects.get(name="Trial upstream").base_url == peer.url


def _fits(page, element: str, card: str) -> tuple[int, int]:
    """(the element's width, the card's inner width): scrollWidth for blocks, the box for inline text."""
    return page.evaluate(
        """([e, c]) => { const el = document.querySelector(e);
            const width = getComputedStyle(el).display === "inline" ? el.getBoundingClientRect().width : el.scrollWidth;
            return [Math.ceil(width), document.querySelector(c).clientWidth]; }""",
        [element, card])


def test_a_long_unbroken_name_stays_inside_its_card(page, people):
    server = services.server_create(workspace=people["workspace"], actor=people["alice"], name=LONG_NAME,
                                    base_url="https://93.184.215.14/mcp")
    login(page, "alice")
    for size in (DESKTOP, PHONE):
        page.set_viewport_size(size)
        page.goto("/servers/")
        expect(page.locator("a.server-name")).to_have_text(LONG_NAME)
        name, card = _fits(page, "a.server-name", "#server-table")
        table, card = _fits(page, "#server-table table", "#server-table")
        assert name <= card and table <= card, (size, name, table, card)
        for url, title in ((f"/servers/{server.pk}/", LONG_NAME), (f"/servers/{server.pk}/edit/", f"Edit {LONG_NAME}")):
            page.goto(url)
            expect(page.locator(".page-head h1")).to_have_text(title)
            heading, main = _fits(page, ".page-head h1", "main")
            assert heading <= main, (size, url, heading, main)
            assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth"), (size, url)
