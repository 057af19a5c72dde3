"""A real OAuth 2.1 authorization server and the MCP resource it protects, on 127.0.0.1, built from
the ``mcp`` SDK's own auth pieces (``mcp.server.auth``), for the tests of OAuth upstreams.

``oauth_peer()`` serves, on one origin:

- the protected MCP endpoint ``/mcp`` (tools ``whoami`` and ``echo``): 401 with
  ``WWW-Authenticate: Bearer … resource_metadata=…`` without a valid token, the token's audience
  checked (RFC 8707);
- protected-resource metadata (RFC 9728) and authorization-server metadata (RFC 8414);
- ``/register`` (dynamic client registration, RFC 7591), the client-credentials grant for
  clients registered by hand, ``/authorize`` (PKCE S256; consent is
  automated: it approves at once for ``peer.subject`` and redirects with ``code``, ``state`` and
  ``iss``, RFC 9207), ``/token`` (authorization code, refresh with rotation: a refresh token works
  once, a second use is ``invalid_grant``) and ``/revoke`` (RFC 7009).

Time never decides a test: access tokens live ``access_ttl`` seconds (long by default) and
``peer.expire_access_tokens()`` ends every current one at once, as their expiry would.
``peer.token_requests`` counts the requests that reached the token endpoint, by grant type, as
they arrived on the wire (answered or refused); ``peer.provider.revoked`` what was revoked.
"""

from __future__ import annotations

import asyncio
import base64
import json
import secrets
import threading
from collections import Counter
from typing import Any
from urllib.parse import parse_qs, unquote

from mcp.shared.auth import OAuthClientInformationFull
from starlette.types import ASGIApp, Receive, Scope, Send

from external_mcp.demo_oauth import SCOPE, MemoryProvider, build_protected_server
from tests.mcp_peers import (
    MCP_PATH,
    RunningPeer,
    _replaying,
    _send_simple,
    _streamable_app,
    _transport_security,
    read_body,
)


class _TokenEndpoint:
    """Counts each POST to ``/token`` by its ``grant_type`` before the server reads it, and answers
    the client-credentials grant, which the SDK's token handler does not know (RFC 6749 §4.4: the
    client authenticates, Basic or in the body, and gets an access token without a refresh token)."""

    def __init__(self, app: ASGIApp, counts: Counter[str], provider: MemoryProvider) -> None:
        self.app = app
        self.counts = counts
        self.provider = provider
        self.gate: threading.Event | None = None
        """While set to an unset Event, refresh requests wait for it before they are answered."""
        self.waiting = threading.Semaphore(0)
        self.refresh_status: int | None = None
        """When set, refresh requests get this status (a server that is down or overloaded)."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] != "/token":
            await self.app(scope, receive, send)
            return
        body = await read_body(receive)
        form = {k: v[0] for k, v in parse_qs(body.decode("latin-1")).items()}
        grant = form.get("grant_type", "")
        self.counts[grant] += 1
        if grant == "refresh_token" and self.gate is not None:
            self.waiting.release()
            await asyncio.to_thread(self.gate.wait, 30)
        if grant == "refresh_token" and self.refresh_status is not None:
            body = json.dumps({"error": "temporarily_unavailable"}).encode()
            await _send_simple(send, self.refresh_status, body, "application/json")
            return
        if grant != "client_credentials":
            await self.app(scope, _replaying(body, receive), send)
            return
        client_id, secret = form.get("client_id"), form.get("client_secret")
        basic = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
        if basic.startswith("Basic "):
            client_id, _, secret = base64.b64decode(basic[6:]).decode().partition(":")
            client_id, secret = unquote(client_id), unquote(secret)
        client = self.provider.clients.get(client_id or "")
        if client is None or client.client_secret != secret:
            await _send_simple(send, 401, json.dumps({"error": "invalid_client"}).encode(), "application/json")
            return
        token = self.provider.issue_access(client.client_id, [SCOPE], form.get("resource"))
        answer = {"access_token": token, "token_type": "Bearer", "expires_in": self.provider.access_ttl}
        await _send_simple(send, 200, json.dumps(answer).encode(), "application/json")


class OAuthPeer(RunningPeer):
    def __init__(self, *, subject: str, access_ttl: int, registration: bool, sse: bool = False) -> None:
        self.subject = subject
        self.sse = sse
        self.access_ttl = access_ttl
        self.registration = registration
        self.provider: MemoryProvider | None = None
        self.token_requests: Counter[str] = Counter()
        self.token_endpoint: _TokenEndpoint
        super().__init__(self._build, name="peer-oauth", path="/sse" if sse else MCP_PATH)

    def _build(self, peer: RunningPeer) -> ASGIApp:
        self.provider = MemoryProvider(peer.base, self.subject, self.access_ttl)
        server = build_protected_server(self.provider, issuer=peer.base, resource=peer.url,
                                        registration=self.registration)
        app = (server.sse_app(transport_security=_transport_security()) if self.sse
               else _streamable_app(server, json_response=True, stateless=True))
        self.token_endpoint = _TokenEndpoint(app, self.token_requests, self.provider)
        return self.token_endpoint

    @property
    def issuer(self) -> str:
        return self.base

    def expire_access_tokens(self) -> None:
        assert self.provider is not None
        self.provider.expire_access_tokens()

    def hold_refreshes(self) -> threading.Event:
        """From now on refresh requests wait, once arrived (``arrived()``), until the returned event is set."""
        self.token_endpoint.gate = threading.Event()
        return self.token_endpoint.gate

    def arrived(self, timeout: float = 30) -> bool:
        """Whether a held refresh request arrived (waits for it)."""
        return self.token_endpoint.waiting.acquire(timeout=timeout)

    def sign_in_as(self, subject: str) -> None:
        """Who the next authorization approves (the person at the browser)."""
        assert self.provider is not None
        self.provider.subject = subject

    def revoke_grants(self) -> None:
        """Every refresh and access token dies at once, as when a user revokes the app at the provider."""
        assert self.provider is not None
        self.provider.refresh.clear()
        self.provider.access.clear()

    def register_client(self, redirect_uri: str, **fields: Any) -> OAuthClientInformationFull:
        """A client registered by hand (what an admin gets from a provider's console)."""
        assert self.provider is not None
        values: dict[str, Any] = {
            "client_id": secrets.token_urlsafe(12), "client_secret": secrets.token_urlsafe(24),
            "redirect_uris": [redirect_uri], "grant_types": ["authorization_code", "refresh_token"],
            "token_endpoint_auth_method": "client_secret_post", "scope": SCOPE, **fields}
        client = OAuthClientInformationFull.model_validate(values)
        self.provider.clients[client.client_id] = client
        return client


def oauth_peer(*, subject: str = "alice", access_ttl: int = 3600, registration: bool = True,
               sse: bool = False) -> OAuthPeer:
    """``sse``: the same protected server on the HTTP+SSE transport, at ``/sse``."""
    return OAuthPeer(subject=subject, access_ttl=access_ttl, registration=registration, sse=sse)
