"""TwinMCP's OAuth client against an authorization server it did not write: django-oauth-toolkit
(``tests/oauth_dot.py``), protecting an MCP server on another origin.

``tests/test_oauth_client.py`` runs the same calls against the SDK-built peer; agreeing with a
second, independent implementation is what shows the client speaks OAuth rather than one
server's dialect. Nothing here waits for time to pass: tokens live an hour, or are born expired.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from urllib.parse import parse_qs, urlsplit

import aiohttp
import httpx2
import mcp_types as types
import pytest
from mcp.client.auth.oauth2 import PKCEParameters
from mcp.shared.auth import OAuthClientInformationFull
from pytest_django.fixtures import Settings

from external_mcp.mcp_client import new_session
from external_mcp.oauth import client as oauth
from external_mcp.oauth.discovery import Discovered, discover
from tests.oauth_dot import SCOPE, DotAuthorizationServer, DotProtectedPeer, dot_as, dot_protected_peer

REDIRECT = "http://127.0.0.1:8000/oauth/callback"
INITIALIZE = {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
    "protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}}}


@pytest.fixture(autouse=True)
def loopback_allowed(settings: Settings) -> None:
    settings.EXTERNAL_MCP_ALLOWED_PROTOCOLS = ["https", "http"]
    settings.EXTERNAL_MCP_ALLOWED_NETWORKS = ["127.0.0.1/32"]


Dot = tuple[DotAuthorizationServer, DotProtectedPeer]
Session = aiohttp.ClientSession


@pytest.fixture(scope="module")
def dot() -> Iterator[Dot]:
    """One DOT process and its protected MCP server for the module: starting Django and migrating
    costs seconds. Tests register their own clients and count token requests as differences."""
    with dot_as() as as_, dot_protected_peer(as_) as peer:
        yield as_, peer


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with new_session() as http:
        yield http


def query_of(location: str) -> dict[str, str]:
    return {k: v[0] for k, v in parse_qs(urlsplit(location).query).items()}


async def consent_and_exchange(as_: DotAuthorizationServer, session: aiohttp.ClientSession, found: Discovered,
                               client: OAuthClientInformationFull, *, user: str = "alice", state: str = "st",
                               resource: str | None = None) -> tuple[dict[str, str], oauth.Tokens]:
    """The admin's round trip: authorization URL with PKCE, DOT's consent page, the code exchanged."""
    pkce = PKCEParameters.generate()
    url = oauth.authorization_url(found.metadata, client_id=client.client_id, redirect_uri=REDIRECT, state=state,
                                  code_challenge=pkce.code_challenge, resource=resource or found.resource,
                                  scope=found.scope)
    back = query_of(await asyncio.to_thread(as_.consent, url, user))
    tokens = await oauth.exchange_code(session, found.metadata, client, code=back["code"],
                                       verifier=pkce.code_verifier, redirect_uri=REDIRECT,
                                       resource=resource or found.resource)
    return back, tokens


async def whoami(peer: DotProtectedPeer, access_token: str) -> str:
    async with peer.sdk_client(headers={"Authorization": f"Bearer {access_token}"}) as client:
        result = await client.call_tool("whoami", {})
    block = result.content[0]
    assert isinstance(block, types.TextContent)
    return block.text


async def status_with(peer: DotProtectedPeer, access_token: str) -> int:
    """What the protected server answers an initialize carrying this token."""
    async with httpx2.AsyncClient(timeout=30, trust_env=False) as http:
        answer = await http.post(peer.url, json=INITIALIZE, headers={
            "Authorization": f"Bearer {access_token}", "Accept": "application/json, text/event-stream"})
    return answer.status_code


async def test_discovery_from_the_protected_servers_401_finds_dots_metadata(dot: Dot, session: Session) -> None:
    as_, peer = dot
    found = await discover(session, peer.url)
    assert found.issuer.rstrip("/") == as_.issuer
    assert str(found.metadata.issuer).rstrip("/") == as_.issuer
    assert found.resource.rstrip("/") == peer.url
    assert str(found.metadata.token_endpoint) == as_.token_endpoint
    assert str(found.metadata.registration_endpoint) == f"{as_.url}/register/"
    assert str(found.metadata.revocation_endpoint) == f"{as_.url}/revoke_token/"
    assert found.metadata.code_challenge_methods_supported == ["S256"]
    assert found.metadata.authorization_response_iss_parameter_supported is True
    assert found.scope == SCOPE


async def test_dynamic_registration_is_answered_with_client_secret_basic(dot: Dot, session: Session) -> None:
    as_, peer = dot
    found = await discover(session, peer.url)
    client = await oauth.register(session, found.metadata, redirect_uri=REDIRECT, scope=found.scope)
    # TwinMCP asks for client_secret_post; RFC 7591 lets DOT substitute, and it does.
    assert client.token_endpoint_auth_method == "client_secret_basic"
    assert client.client_secret and client.grant_types == ["authorization_code", "refresh_token"]
    assert [str(u) for u in client.redirect_uris or []] == [REDIRECT]


async def test_code_flow_refresh_rotation_and_reuse_protection(dot: Dot, session: Session) -> None:
    as_, peer = dot
    before = as_.token_requests()
    found = await discover(session, peer.url)
    client = await oauth.register(session, found.metadata, redirect_uri=REDIRECT, scope=found.scope)
    back, first = await consent_and_exchange(as_, session, found, client, user="carol", state="st-1")
    assert back["state"] == "st-1" and back["iss"] == as_.issuer
    assert first.refresh_token and first.scope == SCOPE and first.expires_at is not None
    assert await whoami(peer, first.access_token) == "carol"

    second = await oauth.refresh(session, found.metadata, client, refresh_token=first.refresh_token,
                                 resource=found.resource)
    assert second.refresh_token and second.refresh_token != first.refresh_token
    assert second.access_token != first.access_token
    assert await status_with(peer, first.access_token) == 401  # rotation ended the old access token
    assert await whoami(peer, second.access_token) == "carol"

    with pytest.raises(oauth.TokenRefused) as replayed:
        await oauth.refresh(session, found.metadata, client, refresh_token=first.refresh_token,
                            resource=found.resource)
    assert replayed.value.permanent and replayed.value.error == "invalid_grant"
    # Reuse protection: the replay revoked the whole family, the successor included.
    assert await status_with(peer, second.access_token) == 401
    with pytest.raises(oauth.TokenRefused) as successor:
        await oauth.refresh(session, found.metadata, client, refresh_token=second.refresh_token,
                            resource=found.resource)
    assert successor.value.permanent and successor.value.error == "invalid_grant"
    assert as_.token_requests() - before == Counter({"authorization_code": 1, "refresh_token": 3})


async def test_revocation_ends_the_refresh_token_and_its_access_token(dot: Dot, session: Session) -> None:
    as_, peer = dot
    before = as_.token_requests()
    found = await discover(session, peer.url)
    client = await oauth.register(session, found.metadata, redirect_uri=REDIRECT, scope=found.scope)
    _, tokens = await consent_and_exchange(as_, session, found, client, user="dave")
    assert tokens.refresh_token is not None
    assert await oauth.revoke(session, found.metadata, client, token=tokens.refresh_token, hint="refresh_token")
    with pytest.raises(oauth.TokenRefused) as refused:
        await oauth.refresh(session, found.metadata, client, refresh_token=tokens.refresh_token,
                            resource=found.resource)
    assert refused.value.permanent and refused.value.error == "invalid_grant"
    assert await status_with(peer, tokens.access_token) == 401
    # RFC 7009 §2.2: a token the server does not know is answered 200 all the same.
    assert await oauth.revoke(session, found.metadata, client, token="never-issued", hint="refresh_token")
    assert as_.token_requests() - before == Counter({"authorization_code": 1, "refresh_token": 1})


async def test_client_credentials_grant_for_a_client_made_for_it(dot: Dot, session: Session) -> None:
    as_, peer = dot
    before = as_.token_requests()
    found = await discover(session, peer.url)
    machine_id, secret = await asyncio.to_thread(as_.create_client, grant_types=["client_credentials"])
    for method in ("client_secret_basic", "client_secret_post"):
        machine = OAuthClientInformationFull(client_id=machine_id, client_secret=secret,
                                             token_endpoint_auth_method=method)
        tokens = await oauth.client_credentials(session, str(found.metadata.token_endpoint), machine,
                                                resource=found.resource, scope=SCOPE)
        assert tokens.refresh_token is None and tokens.expires_at is not None
        assert await whoami(peer, tokens.access_token) == machine_id  # no user: the client itself

    # DOT keeps one grant type per client: the code-flow client may not use this grant.
    registered = await oauth.register(session, found.metadata, redirect_uri=REDIRECT, scope=found.scope)
    with pytest.raises(oauth.TokenRefused) as refused:
        await oauth.client_credentials(session, str(found.metadata.token_endpoint), registered,
                                       resource=found.resource, scope=SCOPE)
    assert refused.value.permanent and refused.value.error == "unauthorized_client"
    wrong = OAuthClientInformationFull(client_id=machine_id, client_secret="wrong",
                                       token_endpoint_auth_method="client_secret_basic")
    with pytest.raises(oauth.TokenRefused) as unknown:
        await oauth.client_credentials(session, str(found.metadata.token_endpoint), wrong,
                                       resource=found.resource, scope=SCOPE)
    assert unknown.value.permanent and unknown.value.error == "invalid_client"
    assert as_.token_requests() - before == Counter({"client_credentials": 4})


async def test_a_person_who_cancels_sends_access_denied_back_with_the_state(dot: Dot, session: Session) -> None:
    as_, peer = dot
    before = as_.token_requests()
    found = await discover(session, peer.url)
    client = await oauth.register(session, found.metadata, redirect_uri=REDIRECT, scope=found.scope)
    pkce = PKCEParameters.generate()
    url = oauth.authorization_url(found.metadata, client_id=client.client_id, redirect_uri=REDIRECT, state="st-2",
                                  code_challenge=pkce.code_challenge, resource=found.resource, scope=found.scope)
    location = await asyncio.to_thread(as_.consent, url, "erin", allow=False)
    assert location.startswith(REDIRECT)
    back = query_of(location)
    assert back["error"] == "access_denied" and back["state"] == "st-2"
    # RFC 9207 §2 asks for `iss` on error responses too; DOT 3.4.1 adds it to successes only, so a
    # client must not treat its absence on an error as a mix-up.
    assert back.get("iss") in (None, as_.issuer)
    assert "code" not in back
    assert as_.token_requests() == before


async def test_a_token_bound_to_another_resource_is_refused_by_the_server(dot: Dot, session: Session) -> None:
    as_, peer = dot
    found = await discover(session, peer.url)
    client = await oauth.register(session, found.metadata, redirect_uri=REDIRECT, scope=found.scope)
    elsewhere = "http://127.0.0.1:9/mcp"
    _, tokens = await consent_and_exchange(as_, session, found, client, resource=elsewhere)
    assert tokens.refresh_token is not None
    assert await status_with(peer, tokens.access_token) == 401  # RFC 8707: DOT bound it to `elsewhere`
    # Nor can the refresh widen it to this server.
    with pytest.raises(oauth.TokenRefused) as refused:
        await oauth.refresh(session, found.metadata, client, refresh_token=tokens.refresh_token,
                            resource=found.resource)
    assert refused.value.error == "invalid_target"


async def test_a_server_without_registration_is_said_so(session: Session) -> None:
    async with dot_as(dcr=False) as as_:
        peer = dot_protected_peer(as_)
        async with peer:
            found = await discover(session, peer.url)
    assert found.metadata.registration_endpoint is None
    with pytest.raises(oauth.TokenRefused, match="no dynamic client registration") as refused:
        await oauth.register(session, found.metadata, redirect_uri=REDIRECT, scope=found.scope)
    assert refused.value.permanent


async def test_an_expired_access_token_is_refused_and_refresh_still_works(session: Session) -> None:
    # Lifetime 0: every access token is expired when issued, whatever the machine's speed.
    async with dot_as(access_ttl=0) as as_:
        peer = dot_protected_peer(as_)
        async with peer:
            found = await discover(session, peer.url)
            client = await oauth.register(session, found.metadata, redirect_uri=REDIRECT, scope=found.scope)
            _, first = await consent_and_exchange(as_, session, found, client)
            assert first.refresh_token is not None
            assert await status_with(peer, first.access_token) == 401
            second = await oauth.refresh(session, found.metadata, client, refresh_token=first.refresh_token,
                                         resource=found.resource)
            assert second.refresh_token and second.refresh_token != first.refresh_token
            assert await status_with(peer, second.access_token) == 401
            counts = as_.token_requests()
    assert counts == Counter({"authorization_code": 1, "refresh_token": 1})

