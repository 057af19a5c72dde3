"""The OAuth peer is a real authorization server and protected MCP resource: discovery documents,
registration, PKCE, iss, rotation, expiry and revocation behave as the specs say, so tests of
OAuth upstreams can rely on it (and fail when TwinMCP gets a step wrong)."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import re
import secrets
from urllib.parse import parse_qs, urlsplit

import httpx2
import pytest

from tests.oauth_peers import oauth_peer

REDIRECT = "http://127.0.0.1:8000/oauth/callback"


def pkce() -> tuple[str, str]:
    verifier = secrets.token_urlsafe(48)
    challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).decode().rstrip("=")
    return verifier, challenge


def authorize(http: httpx2.Client, peer, client_id: str, *, challenge: str, state: str) -> dict[str, list[str]]:
    answer = http.get(f"{peer.base}/authorize", params={
        "response_type": "code", "client_id": client_id, "redirect_uri": REDIRECT, "state": state,
        "code_challenge": challenge, "code_challenge_method": "S256", "scope": "mcp", "resource": peer.url})
    assert answer.status_code == 302, answer.text
    location = answer.headers["location"]
    assert location.startswith(REDIRECT)
    return parse_qs(urlsplit(location).query)


def mcp_call(peer, token: str | None) -> httpx2.Response:
    headers = {"accept": "application/json, text/event-stream", "content-type": "application/json"}
    if token:
        headers["authorization"] = f"Bearer {token}"
    return httpx2.post(peer.url, headers=headers, timeout=10, json={
        "jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
            "protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}}})


def test_discovery_registration_code_flow_rotation_expiry_and_revocation():
    with oauth_peer() as peer, httpx2.Client(timeout=10) as http:
        refused = mcp_call(peer, None)
        challenge_header = refused.headers["www-authenticate"]
        metadata_url = re.search(r'resource_metadata="([^"]+)"', challenge_header).group(1)
        resource = http.get(metadata_url).json()
        server = http.get(f"{peer.base}/.well-known/oauth-authorization-server").json()
        client = http.post(server["registration_endpoint"], json={
            "redirect_uris": [REDIRECT], "grant_types": ["authorization_code", "refresh_token"],
            "token_endpoint_auth_method": "client_secret_post", "scope": "mcp"}).json()
        verifier, challenge = pkce()
        redirected = authorize(http, peer, client["client_id"], challenge=challenge, state="s-1")
        credentials = {"client_id": client["client_id"], "client_secret": client["client_secret"]}
        wrong_verifier = http.post(server["token_endpoint"], data={
            "grant_type": "authorization_code", "code": redirected["code"][0], "redirect_uri": REDIRECT,
            "code_verifier": pkce()[0], "resource": peer.url, **credentials})
        tokens = http.post(server["token_endpoint"], data={
            "grant_type": "authorization_code", "code": redirected["code"][0], "redirect_uri": REDIRECT,
            "code_verifier": verifier, "resource": peer.url, **credentials}).json()
        accepted = mcp_call(peer, tokens["access_token"])
        peer.expire_access_tokens()
        expired = mcp_call(peer, tokens["access_token"])
        refresh = {"grant_type": "refresh_token", "refresh_token": tokens["refresh_token"], **credentials}
        renewed = http.post(server["token_endpoint"], data=refresh).json()
        replayed = http.post(server["token_endpoint"], data=refresh)
        http.post(server["revocation_endpoint"], data={"token": renewed["refresh_token"], **credentials})
        after_revocation = http.post(server["token_endpoint"], data={
            **refresh, "refresh_token": renewed["refresh_token"]})
        counts = dict(peer.token_requests)
        revoked = list(peer.provider.revoked)
    assert refused.status_code == 401 and challenge_header.startswith("Bearer")
    assert [url.rstrip("/") for url in resource["authorization_servers"]] == [peer.issuer]
    assert resource["resource"].rstrip("/") == peer.url
    assert redirected["state"] == ["s-1"] and redirected["iss"] == [peer.issuer]
    assert wrong_verifier.status_code == 400 and wrong_verifier.json()["error"] == "invalid_grant"
    assert accepted.status_code == 200 and expired.status_code == 401
    assert renewed["access_token"] != tokens["access_token"] and renewed["expires_in"] == 3600
    assert replayed.status_code == 400 and replayed.json()["error"] == "invalid_grant"
    assert after_revocation.status_code == 400 and after_revocation.json()["error"] == "invalid_grant"
    assert counts == {"authorization_code": 2, "refresh_token": 3}
    assert revoked == [renewed["refresh_token"]]


def test_the_token_reaches_the_tools_as_the_subject_it_was_issued_to():
    from mcp import Client
    from mcp.client.streamable_http import streamable_http_client

    with oauth_peer(subject="bob") as peer, httpx2.Client(timeout=10) as http:
        client = peer.register_client(REDIRECT)
        verifier, challenge = pkce()
        code = authorize(http, peer, client.client_id, challenge=challenge, state="x")["code"][0]
        tokens = http.post(f"{peer.base}/token", data={
            "grant_type": "authorization_code", "code": code, "redirect_uri": REDIRECT, "code_verifier": verifier,
            "resource": peer.url, "client_id": client.client_id, "client_secret": client.client_secret}).json()

        async def whoami() -> str:
            async with httpx2.AsyncClient(headers={"Authorization": f"Bearer {tokens['access_token']}"}) as h, \
                    Client(streamable_http_client(peer.url, http_client=h), mode="legacy") as mcp:
                return (await mcp.call_tool("whoami", {})).content[0].text

        assert asyncio.run(whoami()) == "bob"


@pytest.mark.parametrize("registration", [True, False])
def test_dynamic_registration_can_be_switched_off(registration):
    with oauth_peer(registration=registration) as peer:
        metadata = httpx2.get(f"{peer.base}/.well-known/oauth-authorization-server", timeout=10).json()
        answer = httpx2.post(f"{peer.base}/register", timeout=10, json={"redirect_uris": [REDIRECT]})
    assert ("registration_endpoint" in metadata) is registration
    assert (answer.status_code == 201) is registration
