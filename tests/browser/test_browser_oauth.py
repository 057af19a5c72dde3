"""OAuth sign-in at an upstream in a real browser (Chromium through Playwright) against the live
server: an admin adds a server behind OAuth 2.1 on the form, clicks Connect, approves on an
independent authorization server's real consent page (django-oauth-toolkit, ``tests/oauth_dot.py``)
and comes back connected; on a per-user server each member connects their own account at the
SDK-built authorization server (automatic consent, ``tests/oauth_peers.py``).

The authorization server sends the browser back to ``<TWINMCP_PUBLIC_URL>/oauth/callback``: the
tests point that setting at the live server. Pages are saved at 1280 px and 390 px in
tests/screenshots/ (``oauth-server-add``, ``oauth-consent``, ``oauth-connected``,
``oauth-per-user``), as every browser test saves them; docs/oauth.md shows copies of the 1280 px
``oauth-server-add``, ``oauth-connected`` and ``oauth-per-user`` kept in docs/img/ (run this
module, then copy them over).
"""

from __future__ import annotations

import re
from urllib.parse import urlsplit

import pytest
from django.conf import settings

from external_mcp import crypto
from external_mcp.choices import ServerStatus
from external_mcp.models import Connection, ExternalMcpServer, ExternalMcpTool
from tests.browser.conftest import login, screenshot
from tests.mcp_peers import LOOPBACK
from tests.oauth_dot import dot_as, dot_protected_peer
from tests.oauth_peers import oauth_peer

pytestmark = pytest.mark.django_db(transaction=True)

SERVER_PAGE = re.compile(r"/servers/[0-9a-f-]{36}/#connection$")


@pytest.fixture(autouse=True)
def _public_url(settings, live_server) -> None:
    """Where the authorization server sends the browser back: this test's live server."""
    settings.TWINMCP_PUBLIC_URL = live_server.url.rstrip("/")



@pytest.fixture
def expect():
    """Playwright's auto-waiting assertions, with the deadline the pages' own waits have (30 s, for a
    broken page only; conftest.py): its 5 s default would be a timing a loaded machine can miss."""
    from playwright.sync_api import expect

    expect.set_options(timeout=30_000)
    yield expect
    expect.set_options(timeout=None)  # back to Playwright's default



def add_oauth_server(page, expect, *, name: str, url: str, per_user: bool = False, shot: str | None = None):
    """The Add a server form with "OAuth 2.1 (sign in at the server)"; returns the saved server."""
    page.goto("/servers/new/")
    page.get_by_label("Name").fill(name)
    page.get_by_label("MCP endpoint URL").fill(url)
    page.get_by_label("Authentication type").select_option("oauth2")
    # htmx swaps in the OAuth fields: the explanation with the redirect URI to register by hand.
    intro = page.locator("#oauth-intro")
    expect(intro).to_contain_text("Connect")
    expect(intro).to_contain_text(f"{settings.TWINMCP_PUBLIC_URL}/oauth/callback")
    expect(page.get_by_label("Client ID (optional)")).to_be_visible()
    if per_user:
        page.get_by_label("Each member's own").check()
    if shot:
        screenshot(page, shot)
    page.get_by_role("button", name="Save and continue").click()
    # Saved: the server's page, at its connection (nothing to test before an account is connected).
    page.wait_for_url(re.compile(r"/servers/[0-9a-f-]{36}/#connection$"))
    expect(page.locator("#server-summary")).to_contain_text("Needs authorization")
    expect(page.locator(".messages")).to_contain_text("account below to discover its tools")
    server = ExternalMcpServer.objects.get(name=name)
    assert server.auth_type == "oauth2" and server.status == ServerStatus.NEEDS_AUTH
    return server


def click_connect(page, destination) -> None:
    """Click Connect and wait for the page it leads to (the authorization server's, or back here)."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    page.locator("#connect-button").click()
    try:
        page.wait_for_url(destination)
        return
    except PlaywrightTimeout:
        pass
    # Say why, e.g. a Content-Security-Policy that refused the redirect off TwinMCP's origin.
    pytest.fail(f"Connect did not lead to {destination}; stayed at {page.url}; the page reported: "
                f"{page.problems.items}")


def tokens_of(server: ExternalMcpServer) -> list[str]:
    """Every token TwinMCP holds for the server, decrypted: none may reach a page."""
    found = []
    for row in Connection.objects.filter(server=server):
        payload = crypto.decrypt_json(row.ciphertext, context=row.context)
        found += [payload[name] for name in ("access_token", "refresh_token") if payload.get(name)]
    return found


def test_an_admin_adds_an_oauth_server_and_connects_it_on_a_real_consent_page(page, people, expect, live_server):
    # Both are Django sites with sessionid and csrftoken cookies, and cookies ignore ports: on one
    # host name, signing in at the authorization server would sign the browser out of TwinMCP.
    assert urlsplit(live_server.url).hostname != LOOPBACK
    with dot_as() as authorization_server, dot_protected_peer(authorization_server) as peer:
        # Signed in at the authorization server already (its test-only auto-login), as carol.
        page.context.add_cookies([authorization_server.browser_cookie("carol")])
        login(page, "alice")
        server = add_oauth_server(page, expect, name="Notes", url=peer.url, shot="oauth-server-add")
        section = page.locator("#connection")
        expect(section.get_by_role("heading", name="Connected account")).to_be_visible()
        expect(page.locator("#connection-missing")).to_contain_text(
            "Not connected yet: every call to Notes is refused until an admin connects its account.")
        connect = page.locator("#connect-button")
        expect(connect).to_have_text("Connect")

        # Off to the authorization server, and its own consent page.
        click_connect(page, f"{authorization_server.url}/**")
        allow = page.locator("input[name=allow]")
        expect(allow).to_be_visible()
        screenshot(page, "oauth-consent")
        allow.click()

        # Back through /oauth/callback to the server's page.
        page.wait_for_url(SERVER_PAGE)
        expect(page.locator(".messages")).to_contain_text(
            "The workspace's account is connected to Notes. A check is queued.")
        facts = page.locator("#connection-facts")
        expect(facts.locator(".badge")).to_have_text("Connected")
        expect(facts).to_contain_text("alice")
        expect(facts).to_contain_text(re.compile(r"Scopes\s*mcp"))
        expect(facts).to_contain_text("renewed automatically")
        expect(connect).to_have_text("Reconnect")
        expect(page.locator("#disconnect-button")).to_be_visible()

        # Test the connection with the connected account, then approve the tools it lists.
        page.get_by_role("button", name="Test connection").click()
        expect(page.locator("#test-outcome")).to_have_attribute("data-ok", "true")
        expect(page.locator('#server-summary [data-status="healthy"]')).to_be_visible()
        page.get_by_role("button", name="Approve selected tools").click()
        expect(page.get_by_text("Approved:")).to_be_visible()

        html = page.content()
        held = tokens_of(server)
        assert held and not any(token in html for token in held)
        screenshot(page, "oauth-connected")

        row = Connection.objects.get(server=server)
        assert row.user_id is None and row.connected_by == people["alice"] and row.scope == "mcp"
        assert set(ExternalMcpTool.objects.filter(server=server).values_list("state", flat=True)) == {"approved"}
        assert authorization_server.token_requests()["authorization_code"] == 1


def test_each_member_connects_their_own_account_on_a_per_user_server(page, people, expect):
    with oauth_peer() as peer:
        login(page, "alice")
        server = add_oauth_server(page, expect, name="Mail", url=peer.url, per_user=True)
        section = page.locator("#connection")
        expect(section.get_by_role("heading", name="Your connection")).to_be_visible()
        expect(page.locator("#connection-missing")).to_contain_text(
            "You have not connected your own account yet: your calls to Mail are refused until you do.")
        expect(section).to_contain_text("Health checks cannot run until an admin connects their own.")

        # The SDK's authorization server consents at once, as alice@corp, and sends the browser back.
        peer.sign_in_as("alice@corp")
        click_connect(page, SERVER_PAGE)
        expect(page.locator(".messages")).to_contain_text("Your account is connected to Mail. A check is queued.")
        expect(page.locator("#connection-facts .badge")).to_have_text("Connected")
        expect(section).to_contain_text("Health checks use alice's connection.")

        # A member sees that their own account is missing, and connects it the same way.
        page.context.clear_cookies()
        login(page, "bob")
        page.goto(f"/servers/{server.pk}/")
        expect(page.locator("#connection-missing")).to_contain_text("You have not connected your own account yet")
        peer.sign_in_as("bob@corp")
        click_connect(page, SERVER_PAGE)
        expect(page.locator(".messages")).to_contain_text("Your account is connected to Mail.")
        expect(page.locator("#connection-facts")).to_contain_text("bob")
        assert page.locator("#member-connections").count() == 0  # members see only their own

        # The admin sees every member's connection, and never a token.
        page.context.clear_cookies()
        login(page, "alice")
        page.goto(f"/servers/{server.pk}/#connection")
        expect(page.locator("#connection-facts")).to_contain_text("alice")
        expect(page.locator("#member-connections")).to_contain_text("bob")
        html = page.content()
        held = tokens_of(server)
        assert len(held) == 4 and not any(token in html for token in held)
        screenshot(page, "oauth-per-user")

    owners = set(Connection.objects.filter(server=server).values_list("user__username", flat=True))
    assert owners == {"alice", "bob"}
    assert ExternalMcpServer.objects.get(pk=server.pk).check_as == people["alice"]
