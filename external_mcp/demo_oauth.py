"""An OAuth-protected MCP server to try TwinMCP's OAuth sign-in with ``make run``: an authorization
server (metadata, dynamic client registration, authorization code with PKCE, rotating refresh
tokens, revocation) and the MCP resource it protects, on one origin, built from the ``mcp`` SDK's
own auth pieces. Consent is automatic: every authorization signs in as ``--user``. Access tokens
live ``--access-ttl`` seconds, so refreshes happen while you watch. State is in memory.

    .venv/bin/python -m external_mcp.demo_oauth --port 8766 --access-ttl 60

then register ``http://127.0.0.1:8766/mcp`` with authentication "OAuth 2.1" and click Connect
(docs/oauth.md). The test suite runs the same server (``tests/oauth_peers.py``).
"""

from __future__ import annotations

import argparse
import secrets
import threading
import time

from mcp.server.auth.middleware.auth_context import get_access_token
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


def build_protected_server(provider: MemoryProvider, *, issuer: str, resource: str,
                           registration: bool = True) -> MCPServer:
    """The MCP server at ``resource``: tools ``whoami`` (the token's subject) and ``echo``."""
    server: MCPServer = MCPServer(
        "demo-oauth", version="1.0.0", log_level="WARNING", auth_server_provider=provider,
        auth=AuthSettings(
            issuer_url=issuer,  # type: ignore[arg-type]
            resource_server_url=resource,  # type: ignore[arg-type]
            validate_token_resource=True,
            client_registration_options=ClientRegistrationOptions(
                enabled=registration, valid_scopes=[SCOPE], default_scopes=[SCOPE]),
            revocation_options=RevocationOptions(enabled=True),
            required_scopes=[SCOPE],
        ),
    )

    @server.tool(description="Who the access token was issued to.")
    def whoami() -> str:
        token = get_access_token()
        return token.subject if token is not None and token.subject else ""

    @server.tool(description="Echo the given text back.")
    def echo(text: str) -> str:
        return text

    return server


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, default=8766)
    parser.add_argument("--user", default="demo-user", help="who every authorization signs in as")
    parser.add_argument("--access-ttl", type=int, default=60, help="access token lifetime in seconds")
    args = parser.parse_args()
    base = f"http://127.0.0.1:{args.port}"
    provider = MemoryProvider(base, args.user, args.access_ttl)
    server = build_protected_server(provider, issuer=base, resource=f"{base}/mcp")
    server.run("streamable-http", host="127.0.0.1", port=args.port, streamable_http_path="/mcp")


if __name__ == "__main__":
    main()
