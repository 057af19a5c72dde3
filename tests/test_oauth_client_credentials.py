"""Servers behind OAuth for machines (``oauth2_client_credentials``): TwinMCP obtains its own token
from the server's authorization server, found by discovery or given, and renews it when the
upstream refuses it; the secret never shows."""

from __future__ import annotations

import asyncio

import pytest
from mcp.shared.exceptions import MCPError

from external_mcp import health, services
from external_mcp.models import ExternalMcpServer
from tests.gateway import agent, proxy_url, register
from tests.oauth_peers import oauth_peer
from usage.models import UsageEvent

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("proxy_settings", "flag_on")]

REDIRECT = "http://127.0.0.1:8000/oauth/callback"


@pytest.mark.parametrize("given_token_url", [False, True])
def test_a_machine_token_is_obtained_used_and_renewed_when_the_upstream_refuses_it(admin, gateway,
                                                                                 given_token_url):
    with oauth_peer() as peer:
        client = peer.register_client(REDIRECT)
        credentials = {"client_id": client.client_id, "client_secret": client.client_secret, "scope": "mcp"}
        if given_token_url:
            credentials["token_url"] = f"{peer.base}/token"
        server = register(admin, peer, name="Machine", auth_type="oauth2_client_credentials",
                          credentials=credentials)

        async def calls():
            async with agent(proxy_url(gateway, server), admin.raw_key) as mcp:
                first = (await mcp.call_tool("echo", {"text": "one"})).content[0].text
                peer.expire_access_tokens()
                second = (await mcp.call_tool("echo", {"text": "two"})).content[0].text
            async with agent(f"{gateway.base}/api/v1/external-mcp/mcp", admin.raw_key) as mcp:
                third = (await mcp.call_tool("machine__echo", {"text": "three"})).content[0].text
            return first, second, third

        texts = asyncio.run(calls())
        grants = dict(peer.token_requests)
        discovered = [r for r in peer.requests if r.path.startswith("/.well-known/oauth")]
    assert texts == ("one", "two", "three")
    assert grants == {"client_credentials": 2}  # the check's token served the gateway; one renewal
    assert (discovered == []) is given_token_url
    assert UsageEvent.objects.filter(tool_name="echo", outcome="ok").count() == 3


def test_refused_client_credentials_fail_the_check_and_the_call_with_a_clear_reason(admin, gateway):
    with oauth_peer() as peer:
        client = peer.register_client(REDIRECT)
        server = services.server_create(
            workspace=admin.workspace, actor=admin.user, name="Machine", base_url=peer.url,
            auth_type="oauth2_client_credentials",
            credentials={"client_id": client.client_id, "client_secret": "not-the-secret-s3cr3t"})
        result, server = health.check_now(ExternalMcpServer.objects.select_related("credential").get(pk=server.pk))

        async def call():
            async with agent(proxy_url(gateway, server), admin.raw_key) as mcp:
                return await mcp.list_tools()

        with pytest.raises(BaseExceptionGroup) as failed:
            asyncio.run(call())
        refused = failed.value.subgroup(lambda exc: isinstance(exc, MCPError))
    assert not result.ok and result.error_class == "auth"
    assert "invalid_client" in result.error_message and "s3cr3t" not in result.error_message
    error = next(iter_leaves(refused))
    assert error.error.code == -32025 and "could not obtain an access token" in error.error.message
    assert "s3cr3t" not in error.error.message


def iter_leaves(group):
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            yield from iter_leaves(exc)
        else:
            yield exc


def test_client_credentials_are_validated_field_by_field(admin):
    from django.core.exceptions import ValidationError

    with pytest.raises(ValidationError) as refused:
        services.server_create(workspace=admin.workspace, actor=admin.user, name="Machine",
                               base_url="https://93.184.215.14/mcp", auth_type="oauth2_client_credentials",
                               credentials={"client_id": "c", "token_url": "http://10.0.0.1/token"})
    errors = refused.value.message_dict
    assert set(errors) == {"credentials.client_secret"}


def test_a_token_url_outside_the_url_policy_is_refused(admin):
    from django.core.exceptions import ValidationError

    with pytest.raises(ValidationError) as refused:
        services.server_create(workspace=admin.workspace, actor=admin.user, name="Machine",
                               base_url="https://93.184.215.14/mcp", auth_type="oauth2_client_credentials",
                               credentials={"client_id": "c", "client_secret": "s", "token_url": "http://10.0.0.1/t"})
    assert set(refused.value.message_dict) == {"credentials.token_url"}


def test_a_short_lived_machine_token_is_reused_until_shortly_before_it_ends(settings):
    import time_machine

    from external_mcp.mcp_client import new_session
    from external_mcp.oauth import tokens

    settings.EXTERNAL_MCP_ALLOWED_PROTOCOLS = ["https", "http"]
    settings.EXTERNAL_MCP_ALLOWED_NETWORKS = ["127.0.0.1/32"]
    with oauth_peer(access_ttl=30) as peer:
        client = peer.register_client(REDIRECT)
        payload = {"client_id": client.client_id, "client_secret": client.client_secret,
                   "token_url": f"{peer.base}/token"}

        async def token() -> str:
            async with new_session() as session:
                return await tokens.access_token(payload, base_url=peer.url, cache_key="short", session=session)

        with time_machine.travel(1_900_000_000, tick=False) as clock:
            first, again = asyncio.run(token()), asyncio.run(token())
            clock.shift(26)
            still = asyncio.run(token())
            clock.shift(2)  # past 30 s minus a tenth of 30 s
            renewed = asyncio.run(token())
        grants = peer.token_requests["client_credentials"]
    assert first == again == still != renewed
    assert grants == 2
