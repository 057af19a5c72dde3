"""Servers behind OAuth sign-in (``oauth2``): an admin (or, per-user, each member) clicks Connect,
signs in at the server's authorization server and comes back connected; agents then call through
TwinMCP with that account, past the access token's end (refreshed once, with rotation), and get
an error naming the page to reconnect when the grant dies. Against a real authorization server
and protected MCP resource on loopback (``tests/oauth_peers.py``); nothing is mocked."""

from __future__ import annotations

import asyncio
import logging
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx2
import pytest
from django.db import connection as db
from django.test import Client as WebClient
from django.utils import timezone
from mcp.shared.exceptions import MCPError

from external_mcp import catalog, connections, health
from external_mcp.choices import ConnectionState, CredentialMode, ServerStatus
from external_mcp.models import Connection, ExternalMcpServer, Notification, OAuthPending, OAuthRevocation
from external_mcp.oauth import revocation
from tests.gateway import agent, proxy_url
from tests.oauth_peers import OAuthPeer, oauth_peer

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("proxy_settings", "flag_on")]

SERVERS = "/api/v1/external-mcp/servers/"


def web(actor: Any) -> WebClient:
    client = WebClient(HTTP_HOST="127.0.0.1")
    client.force_login(actor.user)
    return client


def api(actor: Any) -> WebClient:
    return WebClient(HTTP_HOST="127.0.0.1", HTTP_AUTHORIZATION=f"Bearer {actor.raw_key}")


def create(actor: Any, peer: OAuthPeer, *, mode: str = CredentialMode.SHARED, **fields: Any) -> ExternalMcpServer:
    answer = api(actor).post(SERVERS, {"name": "Notes", "base_url": peer.url, "auth_type": "oauth2",
                                       "credential_mode": mode, **fields}, content_type="application/json")
    assert answer.status_code == 201, answer.content
    assert answer.json()["status"] == ServerStatus.NEEDS_AUTH
    return ExternalMcpServer.objects.get(pk=answer.json()["id"])


def sign_in(authorization_url: str) -> str:
    """The browser at the authorization server: it approves and sends the browser back; the query
    string of that redirect (to TwinMCP's callback) is returned."""
    with httpx2.Client(trust_env=False, follow_redirects=False) as http:
        answer = http.get(authorization_url)
    assert answer.status_code == 302, answer.text
    target = urlsplit(answer.headers["location"])
    assert target.path == "/oauth/callback"
    return target.query


def start(browser: WebClient, server: ExternalMcpServer) -> str:
    """Click Connect (htmx): the authorization URL the browser is sent to."""
    started = browser.post(f"/servers/{server.pk}/connect/", HTTP_HX_REQUEST="true")
    assert started.status_code == 200 and "HX-Redirect" in started, started.content
    return started["HX-Redirect"]


def connect(browser: WebClient, server: ExternalMcpServer) -> Any:
    """Click Connect, sign in, follow the redirect back: TwinMCP's answer to the callback."""
    return browser.get(f"/oauth/callback?{sign_in(start(browser, server))}")


async def call(gateway: Any, server: ExternalMcpServer, key: str, tool: str = "whoami",
               arguments: dict[str, Any] | None = None) -> str:
    async with agent(proxy_url(gateway, server), key) as mcp:
        return (await mcp.call_tool(tool, arguments or {})).content[0].text


def connected(admin: Any, peer: Any) -> ExternalMcpServer:
    """An ``oauth2`` server whose workspace account the admin connected."""
    server = create(admin, peer)
    connect(web(admin), server)
    return server


def refusal(gateway: Any, server: ExternalMcpServer, key: str) -> Any:
    """The JSON-RPC error an agent gets for a call."""
    with pytest.raises(BaseExceptionGroup) as failed:
        asyncio.run(call(gateway, server, key))
    group = failed.value.subgroup(lambda exc: isinstance(exc, MCPError))
    while isinstance(group, BaseExceptionGroup):
        group = group.exceptions[0]
    return group.error


def approve(admin: Any, server: ExternalMcpServer) -> ExternalMcpServer:
    result, server = health.check_now(ExternalMcpServer.objects.get(pk=server.pk))
    assert result.ok, result.error_message
    catalog.tools_approve(server=server, actor=admin.user, select_all=True)
    return server


def test_an_admin_connects_the_workspace_account_and_agents_call_past_the_token_end(admin, member, gateway,
                                                                                    caplog, admin_client):
    caplog.set_level(logging.DEBUG)
    with oauth_peer(subject="alice@notes") as peer:
        server = create(admin, peer)
        started = api(admin).post(f"{SERVERS}{server.pk}/oauth/start/")
        assert started.status_code == 200
        assert started.json()["authorization_url"].startswith(f"{peer.base}/authorize?")
        done = connect(web(admin), server)
        assert done.status_code == 302 and done["Location"] == f"/servers/{server.pk}/#connection"
        server = approve(admin, server)
        before = asyncio.run(call(gateway, server, member.raw_key))
        peer.expire_access_tokens()
        after = asyncio.run(call(gateway, server, member.raw_key, "echo", {"text": "still here"}))
        grants = dict(peer.token_requests)
        page = web(admin).get(f"/servers/{server.pk}/").content.decode()
        listed = api(member).get(f"{SERVERS}{server.pk}/connections/").json()
        row = Connection.objects.get(server=server)
        registered = peer.provider.clients
        tokens = [*peer.provider.access, *peer.provider.refresh, *(c.client_secret for c in registered.values())]
    assert (before, after) == ("alice@notes", "still here")
    assert grants == {"authorization_code": 1, "refresh_token": 1}  # one exchange, one refresh
    assert row.user_id is None and row.connected_by == admin.user and row.version == 2 and row.scope == "mcp"
    # TwinMCP registered itself (RFC 7591): no client was entered. Twice: the API's start never came
    # back, so the Connect after it registered again (the server may have forgotten the first client).
    assert len(registered) == 2
    assert "Connected" in page and 'id="connect-button"' in page and "alice" in page
    assert listed[0]["user"] is None and listed[0]["connected_by"] == "alice" and listed[0]["scope"] == "mcp"
    outputs = [page, str(listed), caplog.text, admin_client.get("/admin/external_mcp/auditevent/").content.decode(),
               api(admin).get(f"{SERVERS}{server.pk}/").content.decode()]
    with db.cursor() as cursor:
        for table in ("external_mcp_connections", "external_mcp_oauth_clients", "external_mcp_credentials",
                      "external_mcp_auditevent"):
            cursor.execute(f"SELECT * FROM {table}")  # noqa: S608 - fixed table names
            outputs.append(repr(cursor.fetchall()))
    for secret in tokens:  # access and refresh tokens, the registered client's secret
        assert secret and not any(secret in text for text in outputs)
    assert ExternalMcpServer.objects.get(pk=server.pk).status == ServerStatus.HEALTHY


def test_the_callback_state_is_single_use_for_the_user_who_started_and_the_issuer_is_checked(admin, member):
    with oauth_peer() as peer:
        server = create(admin, peer)
        browser = web(admin)
        query = sign_in(start(browser, server))
        stolen = web(member).get(f"/oauth/callback?{query}")
        forged_iss = browser.get(f"/oauth/callback?{query.replace('iss=', 'iss=https%3A%2F%2Fevil.example%2F&x=')}",
                                 follow=True)
        replay_after_forgery = browser.get(f"/oauth/callback?{query}")
        fresh = sign_in(start(browser, server))
        state = parse_qs(fresh)["state"][0]
        denied = browser.get(f"/oauth/callback?state={state}&error=access_denied&error_description=no", follow=True)
        no_state = browser.get("/oauth/callback?code=x")
    assert stolen.status_code == 400 and "someone else started it" in stolen.content.decode()
    assert forged_iss.redirect_chain == [(f"/servers/{server.pk}/#connection", 302)]
    assert "iss check" in forged_iss.content.decode()
    assert replay_after_forgery.status_code == 400  # the forged answer used the state up
    assert denied.redirect_chain and "access_denied" in denied.content.decode()
    assert no_state.status_code == 400
    assert not Connection.objects.filter(server=server).exists()
    assert OAuthPending.objects.count() == 0


def test_a_revoked_grant_needs_reauthorization_once_and_agents_are_told_where_to_reconnect(admin, member, gateway):
    with oauth_peer() as peer:
        server = connected(admin, peer)
        server = approve(admin, server)
        peer.revoke_grants()
        errors = [refusal(gateway, server, key) for key in (member.raw_key, admin.raw_key, member.raw_key)]
        grants = dict(peer.token_requests)
    row = Connection.objects.get(server=server)
    assert row.state == ConnectionState.NEEDS_REAUTH and "invalid_grant" in row.last_error
    assert grants == {"authorization_code": 1, "refresh_token": 1}  # the dead grant is not asked again
    url = f"http://127.0.0.1:8000/servers/{server.pk}/"
    for error in errors:
        assert error.code == -32042 and url in error.message and "admin must reconnect" in error.message
        assert error.data["elicitations"][0]["url"] == url and error.data["elicitations"][0]["mode"] == "url"
    assert Notification.objects.filter(kind="connection.needs_reauth").count() == 1  # one admin, once
    assert ExternalMcpServer.objects.get(pk=server.pk).status == ServerStatus.NEEDS_AUTH


def test_per_user_servers_send_each_callers_own_account(admin, member, outsider, gateway, django_user_model):
    with oauth_peer() as peer:
        server = create(admin, peer, mode=CredentialMode.PER_USER)
        peer.sign_in_as("alice@corp")
        connect(web(admin), server)
        server = approve(admin, server)
        missing = refusal(gateway, server, member.raw_key)
        peer.sign_in_as("bob@corp")
        connect(web(member), server)
        mine = asyncio.run(call(gateway, server, member.raw_key))
        theirs = asyncio.run(call(gateway, server, admin.raw_key))
        member_sees = api(member).get(f"{SERVERS}{server.pk}/connections/").json()
        admin_sees = api(admin).get(f"{SERVERS}{server.pk}/connections/").json()
        foreign = api(outsider).post(f"{SERVERS}{server.pk}/oauth/start/")
        page = web(admin).get(f"/servers/{server.pk}/").content.decode()
    assert (mine, theirs) == ("bob@corp", "alice@corp")
    assert missing.code == -32042 and "needs your own account" in missing.message
    assert [c["user"] for c in member_sees] == ["bob"]
    assert sorted(c["user"] for c in admin_sees) == ["alice", "bob"]
    assert foreign.status_code == 404
    assert 'id="member-connections"' in page and "bob" in page
    assert ExternalMcpServer.objects.get(pk=server.pk).check_as == admin.user


def test_disconnecting_revokes_the_tokens_at_the_authorization_server(admin):
    with oauth_peer() as peer:
        server = connected(admin, peer)
        [refresh_token] = list(peer.provider.refresh)
        answer = web(admin).post(f"/servers/{server.pk}/disconnect/")
        queued = OAuthRevocation.objects.count()
        sent = revocation.revocations_send()
        revoked = list(peer.provider.revoked)
    assert answer.status_code == 302 and queued == 1 and sent == 1
    assert revoked[0] == refresh_token and OAuthRevocation.objects.count() == 0
    assert not Connection.objects.filter(server=server).exists()
    assert ExternalMcpServer.objects.get(pk=server.pk).status == ServerStatus.NEEDS_AUTH


def test_a_revocation_the_server_cannot_take_now_is_retried_later(admin):
    with oauth_peer() as peer:
        server = connected(admin, peer)
        connections.connection_delete(connection=Connection.objects.get(server=server), actor=admin.user)
    row = OAuthRevocation.objects.get()  # the peer has stopped: nothing answers
    assert revocation.revocations_send() == 0
    row.refresh_from_db()
    assert row.attempts == 1 and "could not be reached" in row.last_error and row.next_attempt_at > row.created_at


def test_a_members_own_secret_is_sent_for_their_calls_only(admin, member, gateway):
    from tests.mcp_peers import bearer_peer

    with bearer_peer("member-token-s3cr3t") as peer:
        answer = api(admin).post(SERVERS, {"name": "Own", "base_url": peer.url, "auth_type": "bearer",
                                           "credential_mode": "per_user"}, content_type="application/json")
        assert answer.status_code == 201 and answer.json()["status"] == ServerStatus.NEEDS_AUTH
        server = ExternalMcpServer.objects.get(pk=answer.json()["id"])
        given = api(admin).put(f"{SERVERS}{server.pk}/connection/", {"credentials": {"token": "member-token-s3cr3t"}},
                               content_type="application/json")
        server = approve(admin, server)
        missing = refusal(gateway, server, member.raw_key)
        mine = api(member).put(f"{SERVERS}{server.pk}/connection/", {"credentials": {"token": "member-token-s3cr3t"}},
                               content_type="application/json")
        echoed = asyncio.run(call(gateway, server, member.raw_key, "echo", {"text": "hi"}))
        refused_shape = api(member).put(f"{SERVERS}{server.pk}/connection/", {"credentials": {"nope": "x"}},
                                        content_type="application/json")
    assert given.status_code == 200 and mine.status_code == 200 and "s3cr3t" not in mine.content.decode()
    assert missing.code == -32042 and "needs your own account" in missing.message
    assert echoed == "hi"
    assert refused_shape.status_code == 400 and "credentials.nope" in refused_shape.json()


def test_connecting_through_an_independent_authorization_servers_consent_page(admin, gateway):
    """django-oauth-toolkit: a consent page a person submits, Basic client authentication assigned
    at registration, rotation with reuse protection, revocation that ends the grant."""
    from tests.oauth_dot import dot_as, dot_protected_peer

    with dot_as() as authorization_server, dot_protected_peer(authorization_server) as peer:
        server = create(admin, peer)
        browser = web(admin)
        without_script = browser.post(f"/servers/{server.pk}/connect/").content.decode()
        back = urlsplit(authorization_server.consent(start(browser, server), user="carol"))
        done = browser.get(f"/oauth/callback?{back.query}")
        server = approve(admin, server)
        who = asyncio.run(call(gateway, server, admin.raw_key))
        Connection.objects.filter(server=server).update(expires_at=timezone.now())  # ended: renewed before use
        again = asyncio.run(call(gateway, server, admin.raw_key))
        row = Connection.objects.get(server=server)
        browser.post(f"/servers/{server.pk}/disconnect/")
        revoked = revocation.revocations_send()
        counts = authorization_server.token_requests()
    assert done.status_code == 302 and (who, again) == ("carol", "carol")
    assert 'id="continue-sign-in"' in without_script and authorization_server.url in without_script
    assert row.version == 2 and row.state == ConnectionState.ACTIVE
    assert counts["authorization_code"] == 1 and counts["refresh_token"] == 1
    assert revoked == 1


def test_without_dynamic_registration_an_admin_enters_the_client_registered_by_hand(admin, gateway):
    with oauth_peer(registration=False) as peer:
        server = create(admin, peer)
        refused = api(admin).post(f"{SERVERS}{server.pk}/oauth/start/")
        client = peer.register_client("http://127.0.0.1:8000/oauth/callback")
        rotated = api(admin).put(f"{SERVERS}{server.pk}/credentials/", {"credentials": {
            "client_id": client.client_id, "client_secret": client.client_secret}}, content_type="application/json")
        connect(web(admin), server)
        server = approve(admin, server)
        answer = asyncio.run(call(gateway, server, admin.raw_key, "echo", {"text": "by hand"}))
    assert refused.status_code == 502 and "no dynamic client registration" in refused.json()["detail"]
    assert rotated.status_code == 200 and answer == "by hand"
    assert client.client_secret not in rotated.content.decode()


def test_deleting_the_server_revokes_its_tokens(admin):
    with oauth_peer() as peer:
        server = connected(admin, peer)
        [refresh_token] = list(peer.provider.refresh)
        deleted = api(admin).delete(f"{SERVERS}{server.pk}/")
        sent = revocation.revocations_send()
        revoked = list(peer.provider.revoked)
    assert deleted.status_code == 204 and sent == 1 and revoked[0] == refresh_token


def test_members_enter_and_remove_their_own_secret_on_the_server_page(admin, member):
    server = ExternalMcpServer.objects.get(pk=api(admin).post(SERVERS, {
        "name": "Own", "base_url": "https://93.184.215.14/mcp", "auth_type": "api_key",
        "credential_mode": "per_user"}, content_type="application/json").json()["id"])
    browser = web(member)
    before = browser.get(f"/servers/{server.pk}/").content.decode()
    bad = browser.post(f"/servers/{server.pk}/my-credentials/", {"own-header": "Host", "own-value": "k-s3cr3t"})
    good = browser.post(f"/servers/{server.pk}/my-credentials/", {"own-header": "X-Key", "own-value": "k-s3cr3t"})
    after = browser.get(f"/servers/{server.pk}/").content.decode()
    mine = Connection.objects.get(server=server, user=member.user)
    not_theirs = browser.post(f"/servers/{server.pk}/disconnect/", {"connection": str(mine.pk)})
    admin_page = web(admin).get(f"/servers/{server.pk}/").content.decode()
    removed = web(admin).post(f"/servers/{server.pk}/disconnect/", {"connection": str(mine.pk)})
    assert "You have not connected your own credentials yet" in before and 'id="own-secret-form"' in before
    assert bad.status_code == 400 and "reserved" in bad.content.decode() and "k-s3cr3t" not in bad.content.decode()
    assert good.status_code == 302 and "k-s3cr3t" not in after and mine.fingerprint[:8] in after
    assert not_theirs.status_code == 403
    assert 'id="member-connections"' in admin_page and "bob" in admin_page and "k-s3cr3t" not in admin_page
    assert removed.status_code == 302 and not Connection.objects.filter(server=server).exists()
    assert ExternalMcpServer.objects.get(pk=server.pk).status == ServerStatus.NEEDS_AUTH


def test_changing_the_auth_type_drops_the_connection_and_revokes_its_tokens(admin):
    with oauth_peer() as peer:
        server = connected(admin, peer)
        [refresh_token] = list(peer.provider.refresh)
        changed = api(admin).patch(f"{SERVERS}{server.pk}/", {"auth_type": "bearer", "credentials": {"token": "t"}},
                                   content_type="application/json")
        sent = revocation.revocations_send()
        revoked = list(peer.provider.revoked)
    assert changed.status_code == 200 and changed.json()["status"] == ServerStatus.NEW
    assert sent == 1 and revoked[0] == refresh_token
    assert not Connection.objects.filter(server=server).exists()


def test_a_token_the_server_stopped_accepting_early_is_renewed_on_the_workspace_endpoint_too(admin, gateway):
    with oauth_peer() as peer:
        server = connected(admin, peer)
        server = approve(admin, server)
        peer.provider.access.clear()  # the access token dies before its time; the grant lives on

        async def through_the_workspace() -> str:
            async with agent(f"{gateway.base}/api/v1/external-mcp/mcp", admin.raw_key) as mcp:
                return (await mcp.call_tool("notes__echo", {"text": "renewed"})).content[0].text

        answer = asyncio.run(through_the_workspace())
        grants = dict(peer.token_requests)
    assert answer == "renewed" and grants == {"authorization_code": 1, "refresh_token": 1}
