"""The other UI pages: notifications and the bell, the usage dashboard, the API keys page, the quota
banner, the home page, and the Content-Security-Policy every page is served with."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime
from html.parser import HTMLParser

import pytest
import time_machine

from external_mcp import services
from external_mcp.models import Notification
from twinmcp import services as core
from twinmcp.context_processors import quota_banner
from twinmcp.models import ApiKey, Profile
from usage.limiter import get_limiter

PUBLIC_URL = "https://93.184.215.14/mcp"


def html(response) -> str:
    return response.content.decode()


def notify(actor, title: str, kind: str = "server.down", read: bool = False) -> Notification:
    return Notification.objects.create(user=actor.user, workspace=actor.workspace, kind=kind, title=title,
                                       body="body of " + title, dedup_key=title,
                                       read_at=datetime.now(UTC) if read else None)


# -- notifications -----------------------------------------------------------------------------------


def test_bell_counts_unread_and_list_shows_only_mine(admin_web, admin, member):
    notify(admin, "srv is down")
    notify(admin, "srv recovered", kind="server.recovered")
    notify(admin, "old news", read=True)
    notify(member, "not for alice")
    page = html(admin_web.get("/notifications/"))
    assert 'aria-label="Notifications: 2 unread"' in page
    assert "srv is down" in page and "srv recovered" in page and "old news" in page
    assert "not for alice" not in page
    assert "Server down" in page and "Server recovered" in page and page.count(">Unread</span>") == 2
    unread = html(admin_web.get("/notifications/?unread=1"))
    assert "old news" not in unread and "srv is down" in unread
    partial = html(admin_web.get("/notifications/?unread=1", HTTP_HX_REQUEST="true"))
    assert "<html" not in partial and "srv is down" in partial


def test_mark_one_read_with_htmx_updates_the_bell(admin_web, admin, member):
    first = notify(admin, "srv is down")
    notify(admin, "tool changed", kind="tool.changed")
    response = admin_web.post(f"/notifications/{first.pk}/read/", HTTP_HX_REQUEST="true")
    page = html(response)
    assert response.status_code == 200 and "<html" not in page
    assert f'id="notification-{first.pk}"' in page and ">Unread</span>" not in page
    assert 'id="bell"' in page and 'hx-swap-oob="true"' in page and "1 unread" in page
    first.refresh_from_db()
    assert first.read_at is not None
    theirs = notify(member, "member's")
    assert admin_web.post(f"/notifications/{theirs.pk}/read/").status_code == 404
    assert admin_web.post(f"/notifications/{first.pk}/read/")["Location"] == "/notifications/"


def _queries(client, url) -> int:
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    with CaptureQueriesContext(connection) as ctx:
        assert client.get(url).status_code == 200
    return len(ctx)


def test_notification_and_key_lists_do_not_grow_queries_with_rows(admin_web, admin, django_assert_max_num_queries):
    server = services.server_create(workspace=admin.workspace, actor=admin.user, name="crm", base_url=PUBLIC_URL)
    Notification.objects.create(user=admin.user, workspace=admin.workspace, server=server, kind="server.down",
                                title="t0", dedup_key="t0")
    core.api_key_create(user=admin.user, workspace=admin.workspace, name="k0")
    admin_web.get("/notifications/")  # warm the caches
    few = (_queries(admin_web, "/notifications/"), _queries(admin_web, "/api-keys/"))
    for i in range(1, 15):
        Notification.objects.create(user=admin.user, workspace=admin.workspace, server=server, kind="tool.changed",
                                    title=f"t{i}", dedup_key=f"t{i}")
        core.api_key_create(user=admin.user, workspace=admin.workspace, name=f"k{i}")
    assert (_queries(admin_web, "/notifications/"), _queries(admin_web, "/api-keys/")) == few
    with django_assert_max_num_queries(10):
        admin_web.get("/notifications/?unread=1")


def test_mark_all_read(admin_web, admin):
    notify(admin, "a")
    notify(admin, "b")
    response = admin_web.post("/notifications/read-all/", follow=True)
    assert "2 notification(s) marked as read" in html(response)
    assert not Notification.objects.filter(user=admin.user, read_at__isnull=True).exists()
    assert 'aria-label="Notifications: 0 unread"' in html(response)


# -- usage dashboard ---------------------------------------------------------------------------------


def dashboard_attrs(page: str) -> dict[str, str]:
    tag = re.search(r'<div id="usage-dashboard"[^>]*>', page).group(0)
    return {k: v.replace("&amp;", "&") for k, v in re.findall(r'(data-[\w-]+)="([^"]*)"', tag)}


def test_admin_dashboard_filters_and_exports(admin_web, admin, member):
    server = services.server_create(workspace=admin.workspace, actor=admin.user, name="crm", base_url=PUBLIC_URL)
    url = (f"/usage/?user={member.user.pk}&server={server.pk}&tool=lookup&start=2026-01-01&end=2026-01-31"
           "&group_by=user")
    page = html(admin_web.get(url))
    attrs = dashboard_attrs(page)
    assert attrs["data-api-url"] == "/api/v1/external-mcp/usage"
    assert attrs["data-group-by"] == "user"
    query = attrs["data-query"]
    for part in [f"user={member.user.pk}", f"server={server.pk}", "tool=lookup", "start=2026-01-01",
                 "end=2026-01-31"]:
        assert part in query
    csv_link = re.search(r'id="export-csv" href="([^"]+)"', page).group(1).replace("&amp;", "&")
    assert csv_link.startswith("/api/v1/external-mcp/usage/export?format=csv&") and query in csv_link
    assert re.search(r'id="export-json" href="/api/v1/external-mcp/usage/export\?format=json', page)
    assert 'name="user"' in page and "bob" in page
    for canvas in ["chart-requests", "chart-errors", "chart-latency", "chart-tokens"]:
        assert f'id="{canvas}"' in page


def test_member_dashboard_is_always_their_own(member_web, member, admin):
    page = html(member_web.get(f"/usage/?user={admin.user.pk}"))
    assert 'name="user"' not in page
    query = dashboard_attrs(page)["data-query"]
    assert f"user={member.user.pk}" in query and f"user={admin.user.pk}&" not in query + "&"
    assert "Your own tool calls" in page


def test_dashboard_default_period_and_bad_dates(admin_web):
    with time_machine.travel(datetime(2026, 3, 31, 12, tzinfo=UTC), tick=False):
        page = html(admin_web.get("/usage/"))
        assert "start=2026-03-02&end=2026-03-31" in dashboard_attrs(page)["data-query"]
        bad = html(admin_web.get("/usage/?start=2026-03-10&end=2026-03-01"))
    assert 'id="id_end_error"' in bad


# -- API keys ------------------------------------------------------------------------------------------


def test_create_key_shows_it_once_with_a_client_configuration(admin_web, admin):
    server = services.server_create(workspace=admin.workspace, actor=admin.user, name="crm", base_url=PUBLIC_URL)
    created = admin_web.post("/api-keys/", {"name": "laptop", "workspace": str(admin.workspace.pk)})
    assert created.status_code == 302 and created["Location"] == "/api-keys/"
    response = admin_web.get("/api-keys/")
    page = html(response)
    assert response.status_code == 200 and response["Cache-Control"] == "no-store"
    raw = re.search(r'<code id="new-key-value">(tmcp_[\w-]+)</code>', page).group(1)
    key = ApiKey.objects.get(name="laptop")
    assert raw.startswith(key.prefix)
    config_text = re.search(r'<pre class="snippet" id="mcp-config">(.*?)</pre>', page, re.S).group(1)
    config = json.loads(config_text.replace("&quot;", '"').replace("&lt;", "<").replace("&gt;", ">"))
    entry = config["mcpServers"]["twinmcp-acme"]
    assert entry == {"type": "http", "url": "http://testserver/api/v1/external-mcp/mcp",
                     "headers": {"Authorization": f"Bearer {raw}"}}
    assert f"Server crm: <code class=\"break\">http://testserver/api/v1/external-mcp/{server.pk}/mcp</code>" in page
    assert 'data-copy-target="#new-key-value"' in page
    again = html(admin_web.get("/api-keys/"))
    assert raw not in again and key.prefix in again and "laptop" in again


def test_key_errors_list_and_revoke(admin_web, admin, member):
    bad = admin_web.post("/api-keys/", {"name": "", "workspace": str(admin.workspace.pk)})
    assert bad.status_code == 400 and 'id="id_name_error"' in html(bad)
    past = admin_web.post("/api-keys/", {"name": "old", "workspace": str(admin.workspace.pk),
                                         "expires_on": "2001-01-01"})
    assert past.status_code == 400 and 'id="id_expires_on_error"' in html(past)
    key = ApiKey.objects.filter(user=admin.user).first()
    assert admin_web.post(f"/api-keys/{key.pk}/revoke/")["Location"] == "/api-keys/"
    key.refresh_from_db()
    assert key.revoked_at is not None
    assert "Revoked" in html(admin_web.get("/api-keys/"))
    assert admin_web.post(f"/api-keys/{member.key.pk}/revoke/").status_code == 404
    member.key.refresh_from_db()
    assert member.key.revoked_at is None


def test_user_without_workspace_is_told_instead_of_given_a_form(client, django_user_model):
    loner = django_user_model.objects.create_user(username="loner", password="pw-loner-123")
    client.force_login(loner)
    assert "not a member of any workspace" in html(client.get("/api-keys/"))
    response = client.post("/api-keys/", {"name": "x"})
    assert response.status_code == 400 and ApiKey.objects.count() == 0
    assert client.get("/servers/").status_code == 404


def test_api_keys_page_works_without_the_flag(client, admin):
    client.force_login(admin.user)
    response = client.post("/api-keys/", {"name": "ci", "workspace": str(admin.workspace.pk)}, follow=True)
    assert response.redirect_chain == [("/api-keys/", 302)] and "&lt;server id&gt;" in html(response)


# -- quota banner ----------------------------------------------------------------------------------------


@pytest.fixture
def free_limit(settings):
    settings.EXTERNAL_MCP_FREE_DAILY_LIMIT = 10
    return 10


@pytest.fixture
def one_day():
    """The uses counted and the page that shows them fall on the same UTC day, even at 23:59:59."""
    with time_machine.travel(datetime(2026, 6, 1, 15, tzinfo=UTC), tick=False):
        yield


def test_no_banner_below_80_percent(admin_web, admin, free_limit, one_day):
    get_limiter().consume(admin.user.pk, free_limit, 7)
    assert 'id="quota-banner"' not in html(admin_web.get("/"))


def test_warning_banner_from_80_percent(admin_web, admin, free_limit, one_day):
    get_limiter().consume(admin.user.pk, free_limit, 8)
    page = html(admin_web.get("/"))
    assert 'class="banner banner-warning"' in page and "80% of today" in page and "8 of 10" in page
    assert 'href="/billing/"' in page


def test_exhausted_banner_shows_reset_in_the_users_timezone_and_utc(admin_web, admin, free_limit):
    Profile.objects.filter(user=admin.user).update(timezone="Europe/Paris")
    with time_machine.travel(datetime(2026, 6, 1, 15, tzinfo=UTC), tick=False):
        get_limiter().consume(admin.user.pk, free_limit, free_limit)
        page = html(admin_web.get("/servers/"))
    banner = page[page.index('id="quota-banner"'):]
    banner = banner[:banner.index("</div>")]
    assert "Daily limit reached" in banner and 'role="alert"' in page
    assert "Tue 2 Jun, 02:00 Europe/Paris (00:00 UTC)" in banner
    assert 'href="/billing/"' in banner


def test_pro_users_and_anonymous_see_no_banner(admin, client, free_limit):
    core.profile_set_plan(user=admin.user, code="pro")
    get_limiter().consume(admin.user.pk, None, 50)
    assert quota_banner(admin.user) is None
    assert 'id="quota-banner"' not in html(client.get("/accounts/login/"))


def test_banner_never_breaks_a_page(admin_web, admin, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("redis and database both gone")

    monkeypatch.setattr("usage.limiter.UsageLimiter.peek", broken)
    assert admin_web.get("/").status_code == 200


# -- home, CSP, accessibility basics ------------------------------------------------------------------


def test_home_points_a_newcomer_at_adding_a_server(admin_web, member, client):
    page = html(admin_web.get("/"))
    assert 'href="/servers/new/"' in page and "Add a server" in page
    for nav in ['href="/servers/"', 'href="/usage/"', 'href="/api-keys/"', 'href="/notifications/"']:
        assert nav in page
    client.force_login(member.user)
    assert 'href="/servers/new/"' not in html(client.get("/"))


class InlineCode(HTMLParser):
    """Collects what a strict CSP would block: inline scripts, style attributes and elements, on* handlers."""

    def __init__(self) -> None:
        super().__init__()
        self.problems: list[str] = []
        self._in_script = False

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "script" and not attrs.get("src") and attrs.get("type") != "application/json":
            self.problems.append("inline <script>")
        if tag == "style":
            self.problems.append("<style> element")
        if "style" in attrs:
            self.problems.append(f"style attribute on <{tag}>")
        self.problems += [f"{name} handler on <{tag}>" for name in attrs if name.startswith("on")]
        self.problems += [f"{name} (needs eval) on <{tag}>" for name in attrs if name.startswith("hx-on")]
        trigger = attrs.get("hx-trigger") or ""
        if "[" in trigger:
            self.problems.append(f"hx-trigger filter (needs eval) on <{tag}>")


def test_pages_are_served_with_a_strict_csp_and_no_inline_code(admin_web, admin):
    from external_mcp import catalog

    server = services.server_create(workspace=admin.workspace, actor=admin.user, name="s", base_url=PUBLIC_URL,
                                    auth_type="bearer", credentials={"token": "t"})
    catalog.catalog_sync(server=server, tools=[{"name": "a", "description": "x", "inputSchema": {}}])
    catalog.tools_approve(server=server, actor=admin.user, select_all=True)
    catalog.catalog_sync(server=server, tools=[{"name": "a", "description": "y", "inputSchema": {}}])
    notify(admin, "n1")
    pages = ["/", "/servers/", "/servers/new/", f"/servers/{server.pk}/", f"/servers/{server.pk}/edit/",
             f"/servers/{server.pk}/delete/", "/notifications/", "/usage/", "/api-keys/"]
    for url in pages:
        response = admin_web.get(url)
        assert response.status_code == 200, url
        policy = response["Content-Security-Policy"]
        assert "default-src 'self'" in policy and "script-src 'self';" in policy and "unsafe" not in policy
        parser = InlineCode()
        parser.feed(html(response))
        assert parser.problems == [], (url, parser.problems)
        assert '"includeIndicatorStyles": false' in html(response)


def test_django_admin_has_no_inline_code_either(client, db):
    parser = InlineCode()
    parser.feed(html(client.get("/admin/login/")))
    assert [p for p in parser.problems if "style attribute" not in p] == []


def test_swagger_docs_keep_working_under_their_own_policy(client, db):
    response = client.get("/api/docs/")
    assert "'unsafe-inline'" in response["Content-Security-Policy"]
    assert "'unsafe-inline'" not in client.get("/accounts/login/")["Content-Security-Policy"]


def test_a_failed_login_keeps_the_username_and_moves_to_the_password(client, admin):
    page = client.post("/accounts/login/", {"username": "alice<b>", "password": "wrong"}).content.decode()
    assert 'value="alice&lt;b&gt;"' in page and "did not match" in page
    assert page.index('id="id_password"') < page.index("autofocus")
