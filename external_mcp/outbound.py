"""What TwinMCP sends to a server on behalf of a user: the server's stored secret, or the
connection the server needs (the workspace's OAuth account, or with per-user credentials the
caller's own). The proxy and the health checks both ask here."""

from __future__ import annotations

from external_mcp import crypto
from external_mcp.auth_schemes import AuthScheme, OAuthGrantAuth, build_scheme
from external_mcp.choices import AuthType, ConnectionState
from external_mcp.models import Connection, ExternalMcpServer
from external_mcp.oauth.grants import ConnectionNeeded, Grant, connect_url, connection_needed
from external_mcp.services import CredentialUnavailable, credentials_payload


def scheme_for(server: ExternalMcpServer, user_id: int | None) -> AuthScheme:
    """How to authenticate ``user_id``'s calls: the server's stored secret, or the connection it
    needs (the workspace's account, or the caller's own with per-user credentials)."""
    if not server.connects:
        payload = credentials_payload(server=server)
        fingerprint = server.credential.fingerprint if server.has_credentials else ""
        return build_scheme(server.auth_type, payload, cache_key=f"{server.pk}:{fingerprint}")
    if server.per_user and user_id is None:
        raise ConnectionNeeded("Health checks of a server with per-user credentials use an admin's own connection, "
                               "and no admin has connected one yet.", url=connect_url(server.pk))
    row = Connection.objects.used_by(server, user_id).select_related("server").first()
    if row is None or row.state != ConnectionState.ACTIVE:
        raise connection_needed(server_id=server.pk, server_name=server.name, own=server.per_user,
                                again=row is not None)
    try:
        payload = crypto.decrypt_json(row.ciphertext, context=row.context)
    except crypto.DecryptionError as exc:
        raise CredentialUnavailable(f"The stored connection cannot be decrypted ({exc}); connect again.") from None
    if server.auth_type == AuthType.OAUTH2:
        return OAuthGrantAuth(Grant.of(row, payload))
    return build_scheme(server.auth_type, payload, cache_key=f"{server.pk}:{row.fingerprint}")
