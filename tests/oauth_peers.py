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

import base64
import json
import secrets
import threading
import time
from collections import Counter
from typing import Any
from urllib.parse import parse_qs, unquote

from mcp.server.auth.provider import (
    AccessToken,
    AuthorizationCode,
    AuthorizationParams,
    RefreshToken,
    TokenError,
    construct_redirect_uri,
)
from mcp.server.auth.settings import AuthSettings, ClientRegistrationOptions, RevocationOptions
from mcp.server.mcpserver import MCPServer
from mcp.shared.auth import OAuthClientInformationFull, OAuthToken
from starlette.types import ASGIApp, Receive, Scope, Send

from tests.mcp_peers import RunningPeer, _read_body, _replaying, _send_simple, _streamable_app

SCOPE = "mcp"


class MemoryProvider:
    """An authorization server's state in memory: clients, codes and tokens, each checked as a
    strict server would (single-use codes, rotating refresh tokens, expired tokens refused)."""

    def __init__(self, issuer: str, subject: str, access_ttl: int) -> None:
        self.issuer = issuer
        self.subject = subject
        self.access_ttl = access_ttl
        self.clients: dict[str, OAuthClientInformationFull] = {}
        self.codes: dict[str, AuthorizationCode] = {}
        self.access: dict[str, AccessToken] = {}
        self.refresh: dict[str, RefreshToken] = {}
        self.revoked: list[str] = []
        self._lock = threading.Lock()

    async def get_client(self, client_id: str) -> OAuthClientInformationFull | None:
        return self.clients.get(client_id)

    async def register_client(self, client_info: OAuthClientInformationFull) -> None:
        self.clients[client_info.client_id] = client_info

    async def authorize(self, client: OAuthClientInformationFull, params: AuthorizationParams) -> str:
        code = secrets.token_urlsafe(24)
        self.codes[code] = AuthorizationCode(
            code=code, scopes=params.scopes or [SCOPE], expires_at=time.time() + 600, client_id=client.client_id,
            code_challenge=params.code_challenge, redirect_uri=params.redirect_uri,
            redirect_uri_provided_explicitly=params.redirect_uri_provided_explicitly,
            resource=params.resource, subject=self.subject,
        )
        return construct_redirect_uri(str(params.redirect_uri), code=code, state=params.state, iss=self.issuer)

    async def load_authorization_code(self, client: OAuthClientInformationFull, code: str) -> AuthorizationCode | None:
        return self.codes.get(code)

    def issue_access(self, client_id: str, scopes: list[str], resource: str | None,
                     subject: str | None = None) -> str:
        access = secrets.token_urlsafe(24)
        self.access[access] = AccessToken(token=access, client_id=client_id, scopes=scopes, resource=resource,
                                          expires_at=int(time.time()) + self.access_ttl, subject=subject)
        return access

    def _issue(self, client_id: str, scopes: list[str], resource: str | None, subject: str | None) -> OAuthToken:
        access, refresh = self.issue_access(client_id, scopes, resource, subject), secrets.token_urlsafe(24)
        self.refresh[refresh] = RefreshToken(token=refresh, client_id=client_id, scopes=scopes, resource=resource,
                                             subject=subject)
        return OAuthToken(access_token=access, expires_in=self.access_ttl, refresh_token=refresh,
                          scope=" ".join(scopes) or None)

    async def exchange_authorization_code(self, client: OAuthClientInformationFull,
                                          code: AuthorizationCode) -> OAuthToken:
        if self.codes.pop(code.code, None) is None:
            raise TokenError("invalid_grant", "authorization code already used")
        return self._issue(client.client_id, code.scopes, code.resource, code.subject)

    async def load_refresh_token(self, client: OAuthClientInformationFull, token: str) -> RefreshToken | None:
        return self.refresh.get(token)

    async def exchange_refresh_token(self, client: OAuthClientInformationFull, refresh_token: RefreshToken,
                                     scopes: list[str]) -> OAuthToken:
        with self._lock:
            if self.refresh.pop(refresh_token.token, None) is None:
                raise TokenError("invalid_grant", "refresh token already used")
        return self._issue(client.client_id, scopes or refresh_token.scopes, refresh_token.resource,
                           refresh_token.subject)

    async def load_access_token(self, token: str) -> AccessToken | None:
        found = self.access.get(token)
        if found is not None and found.expires_at is not None and found.expires_at <= time.time():
            return None
        return found

    async def revoke_token(self, token: AccessToken | RefreshToken) -> None:
        self.revoked.append(token.token)
        self.access.pop(token.token, None)
        self.refresh.pop(token.token, None)

    def expire_access_tokens(self) -> None:
        for token, access in list(self.access.items()):
            self.access[token] = access.model_copy(update={"expires_at": 0})


class _TokenEndpoint:
    """Counts each POST to ``/token`` by its ``grant_type`` before the server reads it, and answers
    the client-credentials grant, which the SDK's token handler does not know (RFC 6749 §4.4: the
    client authenticates, Basic or in the body, and gets an access token without a refresh token)."""

    def __init__(self, app: ASGIApp, counts: Counter[str], provider: MemoryProvider) -> None:
        self.app = app
        self.counts = counts
        self.provider = provider

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] != "/token":
            await self.app(scope, receive, send)
            return
        body = await _read_body(receive)
        form = {k: v[0] for k, v in parse_qs(body.decode("latin-1")).items()}
        grant = form.get("grant_type", "")
        self.counts[grant] += 1
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
    def __init__(self, *, subject: str, access_ttl: int, registration: bool) -> None:
        self.subject = subject
        self.access_ttl = access_ttl
        self.registration = registration
        self.provider: MemoryProvider | None = None
        self.token_requests: Counter[str] = Counter()
        super().__init__(self._build, name="peer-oauth")

    def _build(self, peer: RunningPeer) -> ASGIApp:
        self.provider = MemoryProvider(peer.base, self.subject, self.access_ttl)
        server: MCPServer = MCPServer(
            "peer-oauth", version="1.0.0", log_level="WARNING", auth_server_provider=self.provider,
            auth=AuthSettings(
                issuer_url=peer.base,  # type: ignore[arg-type]
                resource_server_url=peer.url,  # type: ignore[arg-type]
                validate_token_resource=True,
                client_registration_options=ClientRegistrationOptions(
                    enabled=self.registration, valid_scopes=[SCOPE], default_scopes=[SCOPE]),
                revocation_options=RevocationOptions(enabled=True),
                required_scopes=[SCOPE],
            ),
        )
        subject = self.subject

        @server.tool(description="Who the access token was issued to.")
        def whoami() -> str:
            return subject

        @server.tool(description="Echo the given text back.")
        def echo(text: str) -> str:
            return text

        return _TokenEndpoint(_streamable_app(server, json_response=True, stateless=True), self.token_requests,
                              self.provider)

    @property
    def issuer(self) -> str:
        return self.base

    def expire_access_tokens(self) -> None:
        assert self.provider is not None
        self.provider.expire_access_tokens()

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


def oauth_peer(*, subject: str = "alice", access_ttl: int = 3600, registration: bool = True) -> OAuthPeer:
    return OAuthPeer(subject=subject, access_ttl=access_ttl, registration=registration)
