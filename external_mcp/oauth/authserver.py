"""Which authorization server an ``oauth2`` server uses and which client TwinMCP is there: what the
last Connect discovered (``OAuthClient``), with the client id an admin entered, else the one
TwinMCP registered. Every later token request (refresh, revocation) goes to the endpoints found
then, never to one an upstream names at call time."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from mcp.shared.auth import OAuthClientInformationFull, OAuthMetadata
from pydantic import ValidationError

from external_mcp import crypto
from external_mcp.models import ExternalMcpCredential, ExternalMcpServer, OAuthClient


@dataclass(frozen=True)
class AuthServer:
    metadata: OAuthMetadata
    client: OAuthClientInformationFull
    resource: str


SECRET_METHODS = ("client_secret_basic", "client_secret_post")


def entered_client(payload: dict[str, str], metadata: OAuthMetadata,
                   method: str = "") -> OAuthClientInformationFull | None:
    """The client an admin entered, or None when none was entered. Its secret goes the way that
    worked before (``method``), else the way the server prefers (Basic is RFC 8414's default):
    a client registered by hand says nothing of how it was registered."""
    if not payload.get("client_id"):
        return None
    secret = payload.get("client_secret")
    supported = metadata.token_endpoint_auth_methods_supported or ["client_secret_basic"]
    if not secret:
        method = "none"
    elif method not in SECRET_METHODS:
        method = "client_secret_basic" if "client_secret_basic" in supported else "client_secret_post"
    return OAuthClientInformationFull(client_id=payload["client_id"], client_secret=secret, redirect_uris=None,
                                      token_endpoint_auth_method=method)  # type: ignore[arg-type]


def registered_client(row: OAuthClient) -> OAuthClientInformationFull | None:
    if not row.registration:
        return None
    try:
        return OAuthClientInformationFull.model_validate_json(crypto.decrypt(row.registration, context=row.context))
    except (crypto.DecryptionError, ValidationError):
        return None


def _granted_to(grant: dict[str, Any] | None) -> OAuthClientInformationFull | None:
    try:
        return OAuthClientInformationFull.model_validate(grant["client"]) if grant and grant.get("client") else None
    except ValidationError:
        return None


def stored_metadata(row: OAuthClient) -> OAuthMetadata | None:
    try:
        return OAuthMetadata.model_validate(row.metadata)
    except ValidationError:
        return None


def auth_server_of(server: ExternalMcpServer, grant: dict[str, Any] | None = None) -> AuthServer | None:
    """Where and as which client to renew or revoke a grant: the client stored with the grant's
    tokens when TwinMCP registered it, else the one entered. None when nothing was discovered yet
    or the client cannot be read any more."""
    row = OAuthClient.objects.filter(server=server).first()
    if row is None or (metadata := stored_metadata(row)) is None:
        return None
    credential = ExternalMcpCredential.objects.filter(server=server).first()
    try:
        payload = crypto.decrypt_json(credential.ciphertext, context=str(server.pk)) if credential else {}
    except crypto.DecryptionError:
        return None
    client = entered_client(payload, metadata, row.auth_method) or _granted_to(grant) or registered_client(row)
    return None if client is None else AuthServer(metadata=metadata, client=client, resource=row.resource)


def other_method(client: OAuthClientInformationFull) -> OAuthClientInformationFull | None:
    """The same client presenting its secret the other way (None when it has no secret)."""
    if client.token_endpoint_auth_method not in SECRET_METHODS:
        return None
    other = SECRET_METHODS[1 - SECRET_METHODS.index(client.token_endpoint_auth_method)]
    return client.model_copy(update={"token_endpoint_auth_method": other})
