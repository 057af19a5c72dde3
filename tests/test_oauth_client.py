"""TwinMCP's OAuth client calls against a real authorization server, and against token endpoints
that answer what no honest one would."""

from __future__ import annotations

import asyncio
import json
from urllib.parse import parse_qs, urlsplit

import httpx2
import pytest
from mcp.client.auth.oauth2 import PKCEParameters
from mcp.shared.auth import OAuthClientInformationFull, OAuthMetadata

from external_mcp.mcp_client import new_session
from external_mcp.oauth import client as oauth
from external_mcp.oauth.discovery import discover
from tests import mcp_peers
from tests.oauth_peers import oauth_peer

REDIRECT = "http://127.0.0.1:8000/oauth/callback"


@pytest.fixture(autouse=True)
def loopback_allowed(settings):
    settings.EXTERNAL_MCP_ALLOWED_PROTOCOLS = ["https", "http"]
    settings.EXTERNAL_MCP_ALLOWED_NETWORKS = ["127.0.0.1/32"]


def follow_consent(url: str) -> dict[str, str]:
    """The admin's browser at the authorization URL; the peer consents at once and redirects back."""
    answer = httpx2.get(url, timeout=10)
    assert answer.status_code == 302, answer.text
    return {k: v[0] for k, v in parse_qs(urlsplit(answer.headers["location"]).query).items()}


def test_register_authorize_exchange_refresh_and_revoke_against_a_real_server():
    with oauth_peer(subject="carol") as peer:

        async def flow():
            async with new_session() as session:
                found = await discover(session, peer.url)
                client = await oauth.register(session, found.metadata, redirect_uri=REDIRECT, scope=found.scope)
                pkce = PKCEParameters.generate()
                url = oauth.authorization_url(found.metadata, client_id=client.client_id, redirect_uri=REDIRECT,
                                              state="st", code_challenge=pkce.code_challenge,
                                              resource=found.resource, scope=found.scope)
                back = await asyncio.get_running_loop().run_in_executor(None, follow_consent, url)
                first = await oauth.exchange_code(session, found.metadata, client, code=back["code"],
                                                  verifier=pkce.code_verifier, redirect_uri=REDIRECT,
                                                  resource=found.resource)
                second = await oauth.refresh(session, found.metadata, client, refresh_token=first.refresh_token,
                                             resource=found.resource)
                with pytest.raises(oauth.TokenRefused) as replayed:
                    await oauth.refresh(session, found.metadata, client, refresh_token=first.refresh_token,
                                        resource=found.resource)
                revoked = await oauth.revoke(session, found.metadata, client, token=second.refresh_token,
                                             hint="refresh_token")
                machine = await oauth.client_credentials(session, str(found.metadata.token_endpoint), client,
                                                         resource=found.resource, scope="mcp")
                return back, first, second, replayed.value, revoked, machine

        back, first, second, replayed, revoked, machine = asyncio.run(flow())
        revocations = list(peer.provider.revoked)
        grants = dict(peer.token_requests)
    assert back["state"] == "st" and back["iss"] == peer.issuer
    assert first.expires_at is not None and first.refresh_token and second.access_token != first.access_token
    assert replayed.permanent and replayed.error == "invalid_grant"
    assert revoked and revocations == [second.refresh_token]
    assert machine.access_token and machine.refresh_token is None and machine.expires_at is not None
    assert grants == {"authorization_code": 1, "refresh_token": 2, "client_credentials": 1}


def test_client_secret_basic_is_presented_in_the_authorization_header():
    with oauth_peer() as peer:
        client = peer.register_client(REDIRECT, token_endpoint_auth_method="client_secret_basic")

        async def flow():
            async with new_session() as session:
                found = await discover(session, peer.url)
                pkce = PKCEParameters.generate()
                url = oauth.authorization_url(found.metadata, client_id=client.client_id, redirect_uri=REDIRECT,
                                              state="s", code_challenge=pkce.code_challenge,
                                              resource=found.resource, scope=None)
                back = await asyncio.get_running_loop().run_in_executor(None, follow_consent, url)
                return await oauth.exchange_code(session, found.metadata, client, code=back["code"],
                                                 verifier=pkce.code_verifier, redirect_uri=REDIRECT,
                                                 resource=found.resource)

        assert asyncio.run(flow()).access_token


def token_endpoint(status: int, answer: bytes):
    async def app(scope, receive, send):
        if scope["type"] != "http":
            return
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": answer})

    return mcp_peers.serve_asgi(app, name="token-endpoint", path="/token")


@pytest.mark.parametrize(("status", "answer", "permanent", "reason"), [
    (200, json.dumps({"access_token": "a", "token_type": "mac"}).encode(), False, "not a Bearer token"),
    (200, json.dumps({"access_token": "a\r\nX-Injected: 1", "token_type": "Bearer"}).encode(), False,
     "cannot travel in an HTTP header"),
    (200, b"{" + b" " * (oauth.MAX_ANSWER_BYTES + 10) + b"}", False, "larger than"),
    (503, b"busy", False, "HTTP 503"),
    (429, b"{}", False, "HTTP 429"),
    (400, json.dumps({"error": "invalid_client", "error_description": "unknown"}).encode(), True, "invalid_client"),
])
def test_token_answers_no_honest_server_sends_are_refused_and_classified(status, answer, permanent, reason):
    with token_endpoint(status, answer) as peer:
        metadata = OAuthMetadata.model_validate({
            "issuer": peer.base, "authorization_endpoint": f"{peer.base}/authorize", "token_endpoint": peer.url,
            "response_types_supported": ["code"]})
        client = OAuthClientInformationFull(client_id="c", client_secret="s", redirect_uris=[REDIRECT])

        async def call():
            async with new_session() as session:
                return await oauth.refresh(session, metadata, client, refresh_token="r", resource=peer.url)

        with pytest.raises(oauth.TokenRefused, match=reason) as refused:
            asyncio.run(call())
    assert refused.value.permanent is permanent
