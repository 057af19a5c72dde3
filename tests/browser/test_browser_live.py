"""What an admin watches without reloading: the server page during an upstream outage (status,
history, errors, chart and bell move together), and a tool switched off in the browser while an
agent's SDK client is connected to the gateway (its next call is refused, then allowed again)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import re
import threading
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from mcp.shared.exceptions import MCPError

from external_mcp import catalog, services
from external_mcp.choices import ToolState
from external_mcp.models import ExternalMcpTool, HealthCheck
from tests import mcp_peers
from tests.browser.conftest import check, in_thread, login, screenshot
from tests.gateway import agent, proxy_url
from twinmcp import services as twinmcp_services

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def expect():
    """Playwright's auto-waiting assertions with the 30 s deadline of the pages' own waits (a broken
    page only; its 5 s default is a timing a loaded machine can miss)."""
    from playwright.sync_api import expect

    expect.set_options(timeout=30_000)
    yield expect
    expect.set_options(timeout=None)


def register(people: dict, peer: Any, name: str) -> Any:
    server = services.server_create(workspace=people["workspace"], actor=people["alice"], name=name,
                                    base_url=peer.url)
    result, server = in_thread(check, server.pk)
    assert result.ok, result.error_message
    return server


def test_the_server_page_follows_an_outage_without_a_reload(page, people, expect, settings):
    with mcp_peers.default_peer() as peer:
        server = register(people, peer, "Live upstream")
        login(page, "alice")
        page.goto(f"/servers/{server.pk}/")
        summary = page.locator("#server-summary")
        expect(summary.locator('[data-status="healthy"]')).to_be_visible()
        expect(page.locator("#errors-body")).to_contain_text("No failed check recently.")
        expect(page.locator("#bell")).to_have_attribute("aria-label", "Notifications: 0 unread")
        page.wait_for_function("() => Object.keys(Chart.instances).length === 1")
        page.evaluate("window.__sameDocument = true")  # gone if the page reloads

        peer.stop()
        for _ in range(settings.EXTERNAL_MCP_HEALTH_DOWN_AFTER):
            result, _ = in_thread(check, server.pk)
            assert not result.ok

    expect(summary.locator('[data-status="down"]')).to_be_visible()
    expect(page.locator("#history-body tbody tr").first).to_contain_text("Down")
    errors = page.locator("#errors-body tbody tr")
    expect(errors).to_have_count(settings.EXTERNAL_MCP_HEALTH_DOWN_AFTER)
    expect(errors.first).to_contain_text(HealthCheck.objects.filter(server=server, ok=False).first().error_class)
    failed = settings.EXTERNAL_MCP_HEALTH_DOWN_AFTER
    expect(page.locator("#latency-body figcaption")).to_contain_text(f"{failed} failed")
    expect(page.locator("#bell")).to_have_attribute("aria-label", re.compile(r"Notifications: [1-9]\d* unread"))
    assert page.evaluate("window.__sameDocument === true")
    # The chart was drawn again from the new points, not added beside the old one.
    page.wait_for_function("(n) => Object.values(Chart.instances).length === 1 && "
                           "Object.values(Chart.instances)[0].data.datasets[1].data.filter(v => v === 0).length === n",
                           arg=failed)
    screenshot(page, "server-live-outage")


class AgentThread:
    """An agent's SDK client connected to the gateway, in a thread with its own event loop (Playwright's
    sync API owns this thread's): one coroutine holds the session open and runs what the test asks."""

    def __init__(self, url: str, key: str) -> None:
        self.url, self.key = url, key
        self.loop = asyncio.new_event_loop()
        self.ready: concurrent.futures.Future[None] = concurrent.futures.Future()
        self.thread = threading.Thread(target=self.loop.run_until_complete, args=(self._main(),), daemon=True)

    async def _main(self) -> None:
        self.queue: asyncio.Queue = asyncio.Queue()
        try:
            async with agent(self.url, self.key) as client:
                self.ready.set_result(None)
                while (item := await self.queue.get()) is not None:
                    work, done = item
                    try:
                        done.set_result(await work(client))
                    except Exception as exc:  # noqa: BLE001 - handed to the test's thread
                        done.set_exception(exc)
        except Exception as exc:  # noqa: BLE001
            if not self.ready.done():
                self.ready.set_exception(exc)
            raise

    def run(self, work: Callable[[Any], Awaitable[Any]]) -> Any:
        done: concurrent.futures.Future = concurrent.futures.Future()
        self.loop.call_soon_threadsafe(self.queue.put_nowait, (work, done))
        return done.result(timeout=60)

    def call(self, name: str, arguments: dict) -> Any:
        return self.run(lambda client: client.call_tool(name, arguments))


@contextmanager
def connected_agent(url: str, key: str) -> Iterator[AgentThread]:
    client = AgentThread(url, key)
    client.thread.start()
    client.ready.result(timeout=60)
    try:
        yield client
    finally:
        client.loop.call_soon_threadsafe(client.queue.put_nowait, None)
        client.thread.join(timeout=60)


def test_a_tool_disabled_in_the_browser_is_refused_to_a_connected_agent_at_once(page, people, expect, gateway,
                                                                                  settings):
    settings.ALLOWED_HOSTS = [*settings.ALLOWED_HOSTS, "127.0.0.1"]
    _, raw_key = twinmcp_services.api_key_create(user=people["bob"], workspace=people["workspace"], name="agent")
    with mcp_peers.default_peer() as peer:
        server = register(people, peer, "Switch upstream")
        catalog.tools_approve(server=server, actor=people["alice"], select_all=True)
        with connected_agent(proxy_url(gateway, server), raw_key) as client:
            assert client.call("echo", {"text": "before"}).content[0].text == "before"

            login(page, "alice")
            page.goto(f"/servers/{server.pk}/#tools")
            page.get_by_role("button", name="Disable echo").click()
            expect(page.get_by_role("button", name="Enable echo")).to_be_visible()
            assert ExternalMcpTool.objects.get(server=server, name="echo").state == ToolState.DISABLED
            with pytest.raises(MCPError) as refused:
                client.call("echo", {"text": "during"})
            assert "disabled by a workspace admin" in refused.value.error.message
            screenshot(page, "server-tool-disabled")

            page.get_by_role("button", name="Enable echo").click()
            expect(page.get_by_role("button", name="Disable echo")).to_be_visible()
            assert client.call("echo", {"text": "after"}).content[0].text == "after"
