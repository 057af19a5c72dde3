"""TwinMCP as an OAuth client of an upstream's authorization server: registration (RFC 7591), the
authorization URL with PKCE S256 and the ``resource`` parameter (RFC 8707), the code exchange,
refresh, the client-credentials grant and revocation (RFC 7009).

Each is one short request through TwinMCP's own session (the URL policy applies to every endpoint
a metadata document names), read as hostile input: bounded, validated by the SDK's models, a token
only accepted when it can travel in a header. A refusal says whether it is final (the grant or the
client is dead: an admin must act) or may pass (the server is down or busy): a refresh that fails
must never be mistaken for either.
"""

from __future__ import annotations

import base64
import json
import re
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlencode

import aiohttp
from mcp.shared.auth import OAuthClientInformationFull, OAuthClientMetadata, OAuthMetadata, OAuthToken
from pydantic import ValidationError

from external_mcp import urlpolicy
from external_mcp.oauth import read_capped

MAX_ANSWER_BYTES = 64 * 1024
TIMEOUT = aiohttp.ClientTimeout(total=15, sock_connect=5)
MAX_LIFETIME_SECONDS = 366 * 86400
_HEADER_SAFE = re.compile(r"^[\x21-\x7e]{1,8192}$")
PERMANENT_ERRORS = frozenset({"invalid_grant", "invalid_client", "unauthorized_client", "unsupported_grant_type",
                              "invalid_target",
                              "invalid_scope", "invalid_request"})


class TokenRefused(Exception):
    """The authorization server did not give a token. ``permanent``: retrying cannot help."""

    def __init__(self, message: str, *, error: str = "", permanent: bool = False) -> None:
        super().__init__(message)
        self.error = error
        self.permanent = permanent


@dataclass(frozen=True)
class Tokens:
    access_token: str
    refresh_token: str | None
    expires_at: float | None
    """Absolute (epoch seconds): a relative lifetime means nothing once stored."""
    scope: str | None


def authorization_url(metadata: OAuthMetadata, *, client_id: str, redirect_uri: str, state: str,
                      code_challenge: str, resource: str, scope: str | None) -> str:
    params = {"response_type": "code", "client_id": client_id, "redirect_uri": redirect_uri, "state": state,
              "code_challenge": code_challenge, "code_challenge_method": "S256", "resource": resource}
    if scope:
        params["scope"] = scope
    endpoint = str(metadata.authorization_endpoint)
    return f"{endpoint}{'&' if '?' in endpoint else '?'}{urlencode(params)}"


async def register(session: aiohttp.ClientSession, metadata: OAuthMetadata, *, redirect_uri: str,
                   scope: str | None) -> OAuthClientInformationFull:
    """A client registered at the authorization server for TwinMCP (dynamic registration)."""
    if metadata.registration_endpoint is None:
        raise TokenRefused("The authorization server offers no dynamic client registration: enter a client id "
                           "(and secret) registered with it.", permanent=True)
    request = OAuthClientMetadata(redirect_uris=[redirect_uri],  # type: ignore[list-item]
                                  grant_types=["authorization_code", "refresh_token"], response_types=["code"],
                                  token_endpoint_auth_method="client_secret_post", client_name="TwinMCP",
                                  scope=scope)
    status, body = await _post(session, str(metadata.registration_endpoint),
                               data=request.model_dump_json(exclude_none=True).encode(),
                               headers={"Content-Type": "application/json"})
    if status not in (200, 201):
        raise _refusal("registration", status, body)
    try:
        return OAuthClientInformationFull.model_validate_json(body)
    except ValidationError:
        raise TokenRefused("The authorization server's registration answer is not valid (RFC 7591).") from None


async def exchange_code(session: aiohttp.ClientSession, metadata: OAuthMetadata,
                        client: OAuthClientInformationFull, *, code: str, verifier: str, redirect_uri: str,
                        resource: str) -> Tokens:
    return await _token(session, str(metadata.token_endpoint), client, {
        "grant_type": "authorization_code", "code": code, "redirect_uri": redirect_uri, "code_verifier": verifier,
        "resource": resource})


async def refresh(session: aiohttp.ClientSession, metadata: OAuthMetadata, client: OAuthClientInformationFull, *,
                  refresh_token: str, resource: str) -> Tokens:
    """New tokens; the refresh token is kept when the server sends no new one (RFC 6749 §6)."""
    tokens = await _token(session, str(metadata.token_endpoint), client, {
        "grant_type": "refresh_token", "refresh_token": refresh_token, "resource": resource})
    if tokens.refresh_token is None:
        return Tokens(tokens.access_token, refresh_token, tokens.expires_at, tokens.scope)
    return tokens


async def client_credentials(session: aiohttp.ClientSession, token_endpoint: str,
                             client: OAuthClientInformationFull, *, resource: str, scope: str | None) -> Tokens:
    """A token for TwinMCP itself (machine to machine): nothing to refresh, a new grant when it ends."""
    data = {"grant_type": "client_credentials", "resource": resource}
    if scope:
        data["scope"] = scope
    return await _token(session, token_endpoint, client, data)


async def revoke(session: aiohttp.ClientSession, metadata: OAuthMetadata, client: OAuthClientInformationFull, *,
                 token: str, hint: str) -> bool:
    """Whether the server took the revocation (False: it offers none). RFC 7009: 200 even for a token
    it did not know; anything else is a refusal that may pass."""
    if metadata.revocation_endpoint is None:
        return False
    data, headers = _client_auth(client, {"token": token, "token_type_hint": hint})
    status, body = await _post(session, str(metadata.revocation_endpoint), data=urlencode(data).encode(),
                               headers=headers)
    if status != 200:
        raise _refusal("revocation", status, body)
    return True


async def _token(session: aiohttp.ClientSession, token_endpoint: str, client: OAuthClientInformationFull,
                 data: dict[str, str]) -> Tokens:
    form, headers = _client_auth(client, data)
    status, body = await _post(session, token_endpoint, data=urlencode(form).encode(), headers=headers)
    if status != 200:
        raise _refusal("token", status, body)
    try:
        token = OAuthToken.model_validate_json(body)
    except ValidationError:
        raise TokenRefused("The authorization server's token answer is not a Bearer token (RFC 6749 §5.1).") from None
    for value in (token.access_token, token.refresh_token):
        if value is not None and not _HEADER_SAFE.fullmatch(value):
            raise TokenRefused("The authorization server sent a token that cannot travel in an HTTP header.")
    lifetime = token.expires_in
    expires_at = time.time() + min(max(lifetime, 0), MAX_LIFETIME_SECONDS) if lifetime is not None else None
    return Tokens(token.access_token, token.refresh_token, expires_at, token.scope)


def _client_auth(client: OAuthClientInformationFull, data: dict[str, str]) -> tuple[dict[str, str], dict[str, str]]:
    """The client's credentials the way it registered to present them (RFC 6749 §2.3.1)."""
    headers = {"Content-Type": "application/x-www-form-urlencoded", "Accept": "application/json"}
    method = client.token_endpoint_auth_method or "client_secret_post"
    form = {**data, "client_id": client.client_id}  # in the body too: servers (the SDK's) look the client up by it
    if method == "client_secret_basic" and client.client_secret:
        pair = f"{quote(client.client_id, safe='')}:{quote(client.client_secret, safe='')}"
        headers["Authorization"] = "Basic " + base64.b64encode(pair.encode()).decode()
        return form, headers
    if method == "client_secret_post" and client.client_secret:
        form["client_secret"] = client.client_secret
    return form, headers


async def _post(session: aiohttp.ClientSession, url: str, *, data: bytes,
                headers: dict[str, str]) -> tuple[int, bytes]:
    try:
        urlpolicy.validate_url(url, resolve=False)
        async with session.post(url, data=data, headers=headers, allow_redirects=False,
                                timeout=TIMEOUT) as response:
            body = await read_capped(response, MAX_ANSWER_BYTES)
            status = response.status
    except urlpolicy.UrlPolicyError as exc:
        raise TokenRefused(f"{url} is refused by the URL policy ({exc}).", permanent=True) from None
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise TokenRefused(f"The authorization server could not be reached ({type(exc).__name__}).") from None
    if len(body) > MAX_ANSWER_BYTES:
        raise TokenRefused(f"The authorization server's answer is larger than {MAX_ANSWER_BYTES // 1024} KiB.")
    return status, body


def _refusal(what: str, status: int, body: bytes) -> TokenRefused:
    error, description = "", ""
    try:
        answer: Any = json.loads(body)
    except ValueError:
        answer = None
    if isinstance(answer, dict):
        error = answer.get("error") if isinstance(answer.get("error"), str) else ""
        description = answer.get("error_description") if isinstance(answer.get("error_description"), str) else ""
    error, description = error[:60], description[:300]
    permanent = error in PERMANENT_ERRORS or (400 <= status < 500 and status not in (408, 429) and not error)
    said = f": {error}" + (f" ({description})" if description else "") if error else ""
    return TokenRefused(f"The authorization server refused the {what} request (HTTP {status}){said}.",
                        error=error, permanent=permanent)
