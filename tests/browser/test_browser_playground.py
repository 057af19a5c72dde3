"""The tool playground in a real browser, against the real ASGI application (the gateway's process
serves the pages too: the call's progress streams to the browser, which a WSGI live server cannot
do): open "Try it" on a tool's row, get a field error, fill the form, see the upstream's progress
arrive while the tool is still running, then the result; the JSON editor sends the same call."""

from __future__ import annotations

import re
import threading
from types import SimpleNamespace

import pytest

from external_mcp.models import ExternalMcpServer
from tests import mcp_peers
from tests.browser.conftest import CHROMIUM_ARGS, DESKTOP, PageProblems, in_thread, login, screenshot
from tests.gateway import register
from tests.test_playground import gated_server
from usage.models import UsageEvent

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("midday", "proxy_settings")]


@pytest.fixture
def expect():
    from playwright.sync_api import expect

    expect.set_options(timeout=30_000)
    yield expect
    expect.set_options(timeout=None)


@pytest.fixture
def app_page(browser, gateway, settings):
    """A page on the ASGI application (not the WSGI ``live_server``)."""
    settings.ALLOWED_HOSTS = [*settings.ALLOWED_HOSTS, "localhost", "127.0.0.1"]
    context = browser.new_context(viewport=DESKTOP, base_url=gateway.base)
    context.set_default_timeout(30_000)
    page = context.new_page()
    problems = PageProblems()
    problems.watch(page)
    yield page
    context.close()
    assert problems.items == [], problems.items


def test_try_a_tool_see_its_progress_as_it_runs_then_the_result(app_page, people, expect):
    assert "--no-sandbox" in CHROMIUM_ARGS  # the module's browser is conftest's
    page = app_page
    gate = threading.Event()
    alice = people["alice"]
    try:
        with mcp_peers.mcp_peer(name="peer-playground", server_factory=lambda: gated_server(gate)) as peer:
            server: ExternalMcpServer = in_thread(register, SimpleNamespace(workspace=people["workspace"], user=alice),
                                                  peer)
            login(page, "alice")
            page.goto(f"/servers/{server.pk}/#tools")
            page.get_by_role("link", name="Try gated").click()
            page.wait_for_url(re.compile(r"/playground/\?tool=gated$"))
            expect(page.get_by_role("heading", name="Try gated")).to_be_visible()

            page.get_by_role("button", name="Call gated").click()  # "label" is required and empty
            expect(page.locator("#playground-form .errorlist")).to_have_text("This field is required.")
            expect(page.get_by_label("label")).to_be_focused()

            page.get_by_label("label").fill("job")
            page.get_by_role("button", name="Call gated").click()
            progress = page.locator("#playground-progress")
            expect(progress).to_contain_text("Progress 1 / 2: job: waiting")
            expect(page.locator("#playground-form .errorlist")).to_have_count(0)  # the earlier error is gone
            expect(page.locator("#playground-bar")).to_have_attribute("value", "1")
            expect(page.locator("#playground-answer")).to_have_text("")  # the tool is still waiting
            screenshot(page, "playground-progress")
            gate.set()
            expect(page.locator("#playground-result")).to_have_text("job done")
            expect(progress).to_contain_text("Progress 2 / 2: job: released")
            expect(page.locator("#playground-latency")).to_contain_text("Answered in")
            screenshot(page, "playground-result")

            page.goto(f"/servers/{server.pk}/playground/?tool=echo")
            page.get_by_role("button", name="Edit as JSON").click()
            expect(page.get_by_role("button", name="Edit as form")).to_have_attribute("aria-pressed", "true")
            page.get_by_label("Arguments (JSON)").fill('{"text": "<b>sent as JSON</b>"}')
            page.get_by_role("button", name="Call echo").click()
            expect(page.locator("#playground-result")).to_have_text("<b>sent as JSON</b>")  # shown as text
    finally:
        gate.set()
    events = UsageEvent.objects.filter(user_id=alice.pk, method="tools/call", request_id__startswith="playground-")
    assert sorted(events.values_list("tool_name", flat=True)) == ["echo", "gated"]
