"""Connecting an account with the authorization-code flow (PKCE S256, RFC 8707 ``resource``,
RFC 9207 ``iss``), split across two requests that may reach different workers.

``authorization_start`` discovers the authorization server, finds or registers TwinMCP's client,
and keeps the PKCE verifier under the hash of a random ``state``; the browser goes to the returned
URL. ``authorization_finish`` (the callback) takes that row once, only for the user who started,
only before it ends, checks ``iss`` and exchanges the code. The state is never stored in clear,
so a database read alone cannot complete someone's authorization."""

from __future__ import annotations

import asyncio
import hashlib
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from django.conf import settings
from django.contrib.auth.models import AbstractBaseUser
from django.core.exceptions import PermissionDenied
from django.db import transaction
from django.db.models import Q
from django.utils import timezone
from mcp.client.auth.exceptions import OAuthFlowError
from mcp.client.auth.oauth2 import PKCEParameters
from mcp.client.auth.utils import validate_authorization_response_iss
from mcp.shared.auth import OAuthClientInformationFull

from external_mcp import crypto, mcp_client, urlpolicy
from external_mcp.choices import AuthType
from external_mcp.connections import connection_save_tokens, is_admin
from external_mcp.models import Connection, ExternalMcpServer, OAuthClient, OAuthPending
from external_mcp.oauth import client as oauth
from external_mcp.oauth.authserver import entered_client, other_method, registered_client, stored_metadata
from external_mcp.oauth.discovery import Discovered, DiscoveryError, discover
from external_mcp.services import CredentialUnavailable, credentials_payload

MAX_PARAM_CHARS = 2048


class AuthorizationFailed(Exception):
    """Why connecting failed, for the person who tried; ``server`` when it is known. ``status`` and
    ``field`` for the API: 400 for what the caller can fix, 502 for what the upstream answered."""

    def __init__(self, message: str, *, server: ExternalMcpServer | None = None, status: int = 502,
                 field: str = "base_url") -> None:
        super().__init__(message)
        self.server, self.status, self.field = server, status, field


def redirect_uri() -> str:
    return f"{settings.TWINMCP_PUBLIC_URL}/oauth/callback"


def _state_hash(state: str) -> str:
    return hashlib.sha256(state.encode()).hexdigest()


def may_connect(*, server: ExternalMcpServer, user: Any, own: bool) -> bool:
    """A member connects their own account on a per-user server; only an admin the workspace's."""
    if server.auth_type != AuthType.OAUTH2 or own != server.per_user:
        return False
    return own or is_admin(server=server, user=user)


def authorization_start(*, server: ExternalMcpServer, user: AbstractBaseUser) -> str:
    """The authorization URL to send ``user``'s browser to (their own connection on a per-user server)."""
    own = server.per_user
    if server.auth_type != AuthType.OAUTH2:
        raise AuthorizationFailed(f"{server.name} does not use OAuth sign-in (auth_type {server.auth_type}).",
                                  server=server, status=400, field="auth_type")
    if not may_connect(server=server, user=user, own=own):
        raise PermissionDenied("Only a workspace admin can connect the workspace's account.")
    try:
        payload = credentials_payload(server=server) or {}
    except CredentialUnavailable as exc:
        raise AuthorizationFailed(str(exc), server=server, status=400, field="credentials") from None
    known = OAuthClient.objects.filter(server=server).first()
    # An earlier Connect of this user that never came back may have failed at the authorization
    # server because it forgot TwinMCP's client (servers restart, registrations expire): register
    # again rather than send them back to the same dead end.
    abandoned = OAuthPending.objects.filter(server=server, user=user).exists()
    found, client, registered = asyncio.run(_prepare(server.base_url, payload, known, reuse=not abandoned))
    try:  # the admin's browser goes there: a scheme the policy refuses (http outside make run) is not followed
        urlpolicy.validate_url(str(found.metadata.authorization_endpoint), resolve=False)
    except urlpolicy.UrlPolicyError as exc:
        raise AuthorizationFailed(f"The authorization server's sign-in page is refused by the URL policy ({exc}).",
                                  server=server) from None
    pkce, state = PKCEParameters.generate(), secrets.token_urlsafe(32)
    scope = payload.get("scopes") or found.scope or ""
    with transaction.atomic():
        values: dict[str, Any] = {
            "issuer": found.issuer, "resource": found.resource, "scope": scope[:1000], "discovered_at": timezone.now(),
            "metadata": found.metadata.model_dump(mode="json", exclude_none=True), "redirect_uri": redirect_uri()}
        if registered:
            values["registration"] = crypto.encrypt(client.model_dump_json(exclude_none=True).encode(),
                                                    context=OAuthClient(server_id=server.pk).context)
            values["key_id"] = crypto.current_key_id()
        OAuthClient.objects.update_or_create(server=server, defaults=values)
        OAuthPending.objects.filter(Q(expires_at__lt=timezone.now()) | Q(server=server, user=user)).delete()
        pending = OAuthPending(state_hash=_state_hash(state), server=server, user=user, own=own,
                               key_id=crypto.current_key_id(),
                               expires_at=timezone.now() + timedelta(seconds=settings.EXTERNAL_MCP_OAUTH_STATE_SECONDS))
        # The client goes with the verifier: the code is bound to it, whatever a later Connect registers.
        pending.verifier = crypto.encrypt_json({"verifier": pkce.code_verifier, "client": None if payload.get(
            "client_id") else client.model_dump(mode="json", exclude_none=True)}, context=pending.context)
        pending.save()
    return oauth.authorization_url(found.metadata, client_id=client.client_id, redirect_uri=redirect_uri(),
                                   state=state, code_challenge=pkce.code_challenge, resource=found.resource,
                                   scope=scope or None)


async def _prepare(base_url: str, payload: dict[str, str], known: OAuthClient | None, *,
                   reuse: bool) -> tuple[Discovered, OAuthClientInformationFull, bool]:
    """What the server's metadata says now, and the client to use: the entered one, the one
    registered before at the same issuer for the same callback (when ``reuse``), else a new
    registration."""
    async with mcp_client.new_session(limit=4) as session:
        try:
            found = await discover(session, base_url)
        except DiscoveryError as exc:
            raise AuthorizationFailed(f"TwinMCP could not find the server's authorization server: {exc}") from None
        entered = entered_client(payload, found.metadata, known.auth_method if known else "")
        if entered is not None:
            return found, entered, False
        if reuse and known is not None and known.issuer == found.issuer and known.redirect_uri == redirect_uri():
            stored = registered_client(known)
            if stored is not None:
                return found, stored, False
        try:
            registered = await oauth.register(session, found.metadata, redirect_uri=redirect_uri(), scope=found.scope)
        except oauth.TokenRefused as exc:
            raise AuthorizationFailed(f"TwinMCP could not register itself as a client: {exc}") from None
        return found, registered, True


@dataclass(frozen=True)
class Finished:
    server: ExternalMcpServer
    connection: Connection


def authorization_finish(*, user: AbstractBaseUser, params: dict[str, str]) -> Finished:
    """The callback: ``params`` is its query string (``state``, then ``code`` and ``iss``, or ``error``)."""
    state = params.get("state", "")
    if not state or len(state) > MAX_PARAM_CHARS:
        raise AuthorizationFailed("The authorization server sent no state: start again from the server's page.")
    with transaction.atomic():
        pending = (OAuthPending.objects.select_for_update().select_related("server")
                   .filter(state_hash=_state_hash(state), user=user, expires_at__gt=timezone.now()).first())
        if pending is None:
            raise AuthorizationFailed("This authorization is not valid: it was used already, it is too old, or "
                                      "someone else started it. Start again from the server's page.")
        pending.delete()
    server = pending.server
    if "error" in params:
        error = params["error"][:60]
        described = params.get("error_description", "")[:300]
        raise AuthorizationFailed(f"The authorization server did not authorize TwinMCP: {error}"
                                  + (f" ({described})" if described else "") + ".", server=server)
    code = params.get("code", "")
    if not code or len(code) > MAX_PARAM_CHARS:
        raise AuthorizationFailed("The authorization server sent no code.", server=server)
    if not may_connect(server=server, user=user, own=pending.own):
        raise AuthorizationFailed("You may no longer connect this server's account.", server=server)
    known = OAuthClient.objects.filter(server=server).first()
    metadata = stored_metadata(known) if known is not None else None
    if known is None or metadata is None:
        raise AuthorizationFailed("The server's OAuth settings changed meanwhile: start again.", server=server)
    try:
        validate_authorization_response_iss(params.get("iss"), metadata)
    except OAuthFlowError:
        raise AuthorizationFailed("The answer does not come from the authorization server TwinMCP sent you to "
                                  "(RFC 9207 iss check): refused. Start again.", server=server) from None
    payload = credentials_payload(server=server) or {}
    started = crypto.decrypt_json(pending.verifier, context=pending.context)
    entered = entered_client(payload, metadata, known.auth_method)
    client = entered or (OAuthClientInformationFull.model_validate(started["client"]) if started["client"] else None)
    if client is None:
        raise AuthorizationFailed("The client id entered for this server was removed meanwhile: start again.",
                                  server=server)
    verifier = started["verifier"]
    try:
        tokens, client = asyncio.run(_exchange(metadata, client, code, verifier, known.resource,
                                               retry_other_method=entered is not None))
    except oauth.TokenRefused as exc:
        raise AuthorizationFailed(f"TwinMCP could not obtain tokens: {exc}", server=server) from None
    if entered is not None and client.token_endpoint_auth_method != known.auth_method:
        OAuthClient.objects.filter(pk=known.pk).update(auth_method=client.token_endpoint_auth_method or "")
    connection = connection_save_tokens(
        server=server, user=user, own=pending.own, access_token=tokens.access_token,
        client=None if entered else client.model_dump(mode="json", exclude_none=True),
        refresh_token=tokens.refresh_token, scope=tokens.scope or known.scope,
        expires_at=None if tokens.expires_at is None else datetime.fromtimestamp(tokens.expires_at, tz=UTC))
    return Finished(server=server, connection=connection)


async def _exchange(metadata: Any, client: OAuthClientInformationFull, code: str, verifier: str, resource: str, *,
                    retry_other_method: bool) -> tuple[oauth.Tokens, OAuthClientInformationFull]:
    """The tokens, and the client as it authenticated. A client entered by hand whose secret the
    server refuses one way (``invalid_client``) is tried the other way once: its code is only
    spent when the server accepts the client."""
    async with mcp_client.new_session(limit=2) as session:
        try:
            return await oauth.exchange_code(session, metadata, client, code=code, verifier=verifier,
                                             redirect_uri=redirect_uri(), resource=resource), client
        except oauth.TokenRefused as exc:
            other = other_method(client) if retry_other_method and exc.error == "invalid_client" else None
            if other is None:
                raise
        return await oauth.exchange_code(session, metadata, other, code=code, verifier=verifier,
                                         redirect_uri=redirect_uri(), resource=resource), other
