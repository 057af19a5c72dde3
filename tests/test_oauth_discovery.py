"""Discovery of an OAuth upstream's authorization server, against a real one, and against the
ways a hostile server can point TwinMCP elsewhere."""

from __future__ import annotations

import asyncio
import json

import pytest

from external_mcp.mcp_client import new_session
from external_mcp.oauth.discovery import MAX_DOCUMENT_BYTES, DiscoveryError, discover
from tests import mcp_peers
from tests.oauth_peers import oauth_peer


@pytest.fixture
def loopback_allowed(settings):
    settings.EXTERNAL_MCP_ALLOWED_PROTOCOLS = ["https", "http"]
    settings.EXTERNAL_MCP_ALLOWED_NETWORKS = ["127.0.0.1/32"]


def run_discovery(url: str):
    async def go():
        async with new_session() as session:
            return await discover(session, url)

    return asyncio.run(go())


def test_the_authorization_server_is_found_from_the_servers_401(loopback_allowed):
    with oauth_peer() as peer:
        found = run_discovery(peer.url)
    assert found.issuer.rstrip("/") == peer.issuer
    assert found.resource.rstrip("/") == peer.url
    assert str(found.metadata.token_endpoint) == f"{peer.base}/token"
    assert str(found.metadata.registration_endpoint) == f"{peer.base}/register"
    assert found.scope == "mcp"


def test_a_server_that_does_not_ask_for_oauth_is_said_so(loopback_allowed):
    with mcp_peers.stateless_peer() as peer, pytest.raises(DiscoveryError, match="does not ask for OAuth"):
        run_discovery(peer.url)


def test_the_url_policy_applies_to_the_server(settings):
    settings.EXTERNAL_MCP_ALLOWED_NETWORKS = []
    settings.EXTERNAL_MCP_ALLOWED_PROTOCOLS = ["https", "http"]
    with oauth_peer() as peer, pytest.raises(DiscoveryError, match="URL policy"):
        run_discovery(peer.url)


def hostile(resource_metadata=None, server_metadata=None, *, metadata_status: int = 200):
    """A server whose 401 and documents say what the test wants."""

    async def app(scope, receive, send):
        if scope["type"] != "http":
            return
        base = f"http://127.0.0.1:{scope['server'][1]}"
        path = scope["path"]
        if path == "/mcp":
            await send({"type": "http.response.start", "status": 401, "headers": [
                (b"www-authenticate", f'Bearer resource_metadata="{base}/prm"'.encode())]})
            await send({"type": "http.response.body", "body": b""})
            return
        if path == "/prm" and resource_metadata is not None:
            body = resource_metadata(base)
        elif path == "/.well-known/oauth-authorization-server" and server_metadata is not None:
            body = server_metadata(base)
        else:
            await send({"type": "http.response.start", "status": 404, "headers": []})
            await send({"type": "http.response.body", "body": b""})
            return
        status = metadata_status if path == "/prm" else 200
        headers = [(b"content-type", b"application/json")]
        if status in (301, 302):
            headers.append((b"location", f"{base}/elsewhere".encode()))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    return mcp_peers.serve_asgi(app, name="hostile-oauth")


def prm(resource: str | None = None, servers: list[str] | None = None):
    return lambda base: json.dumps({"resource": resource or f"{base}/mcp",
                                    "authorization_servers": servers if servers is not None else [base]}).encode()


def asm(issuer: str | None = None):
    return lambda base: json.dumps({
        "issuer": issuer or f"{base}/", "authorization_endpoint": f"{base}/authorize",
        "token_endpoint": f"{base}/token", "response_types_supported": ["code"]}).encode()


@pytest.mark.parametrize(("peer_factory", "reason"), [
    (lambda: hostile(prm(resource="https://bank.example/mcp"), asm()), "not the server's URL"),
    (lambda: hostile(prm(), asm(issuer="https://evil.example/")), "names the issuer"),
    (lambda: hostile(prm(servers=[]), asm()), "not valid"),
    (lambda: hostile(lambda base: b"x" * (MAX_DOCUMENT_BYTES + 10), asm()), "larger than"),
    (lambda: hostile(lambda base: b"not json", asm()), "not valid"),
    (lambda: hostile(prm(), None, metadata_status=302), "publishes no metadata"),
    (lambda: hostile(prm(servers=["http://10.0.0.1/"]), asm()), "URL policy"),
    (lambda: hostile(prm(), None), "publishes no metadata"),
])
def test_documents_that_point_elsewhere_or_break_the_rules_are_refused(loopback_allowed, peer_factory, reason):
    with peer_factory() as peer, pytest.raises(DiscoveryError, match=reason):
        run_discovery(peer.url)


def test_a_server_without_resource_metadata_is_its_own_authorization_server(loopback_allowed):
    """The 2025-03-26 arrangement: no RFC 9728 document, the metadata at the server's origin."""
    with hostile(None, asm()) as peer:
        found = run_discovery(peer.url)
    assert found.issuer == f"{peer.base}/" and found.resource == peer.url
    assert str(found.metadata.token_endpoint) == f"{peer.base}/token"
