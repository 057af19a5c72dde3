"""Writes to connections: the account (OAuth grant) or the member's own secret the proxy sends for
a server whose calls need one (``ExternalMcpServer.connects``).

A shared ``oauth2`` server has one connection, made by an admin, used for every member's calls;
with per-user credentials each member makes their own and the proxy sends the caller's. Health
checks use the shared connection, or the one of the member the server names (``check_as``: the
first admin who connects). Tokens a change drops are queued for revocation in the same
transaction (``external_mcp.oauth.revocation``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from django.contrib.auth.models import AbstractBaseUser
from django.db import transaction
from django.utils import timezone

from external_mcp import crypto
from external_mcp.choices import AuditAction, AuthType, ConnectionState, NotificationKind, ServerStatus
from external_mcp.credentials import validate_credentials
from external_mcp.models import AuditEvent, Connection, ExternalMcpServer, OAuthClient, connection_context
from external_mcp.notifications import notify_admins, notify_users
from external_mcp.oauth.revocation import revocation_queue
from external_mcp.queue import queue_check
from external_mcp.status import transition
from twinmcp import invalidation
from twinmcp.models import Membership, Role


def _audit(*, server: ExternalMcpServer, actor: Any, action: str, changes: dict[str, Any]) -> None:
    AuditEvent.objects.create(workspace_id=server.workspace_id, server=server, server_name=server.name,
                              actor=actor, action=action, changes=changes)


def is_admin(*, server: ExternalMcpServer, user: Any) -> bool:
    return Membership.objects.filter(workspace_id=server.workspace_id, user=user, role=Role.ADMIN).exists()


def checks_use(server: ExternalMcpServer) -> Connection | None:
    """The connection health checks send, if there is one they can use."""
    if server.per_user and server.check_as_id is None:
        return None
    return Connection.objects.filter(server=server, user_id=server.check_as_id if server.per_user else None,
                                     state=ConnectionState.ACTIVE).first()


def _revoke(server: ExternalMcpServer, row: Connection) -> None:
    """Queue the revocation of a connection's OAuth tokens (a secret entered by hand has none; a
    row no key can decrypt has nothing left to revoke)."""
    try:
        payload = crypto.decrypt_json(row.ciphertext, context=row.context)
    except crypto.DecryptionError:
        return
    revocation_queue(server=server, payload=payload)


def _save(*, server: ExternalMcpServer, user: Any, own: bool, payload: dict[str, Any],
          values: dict[str, Any]) -> Connection:
    """Create or replace the connection; the tokens it replaces are revoked."""
    owner_id = user.pk if own else None
    previous = Connection.objects.select_for_update().filter(server=server, user_id=owner_id).first()
    if previous is not None:
        _revoke(server, previous)
    row = previous or Connection(server=server, user_id=owner_id)
    row.ciphertext = crypto.encrypt_json(payload, context=connection_context(server.pk, owner_id))
    row.key_id = crypto.current_key_id()
    row.fingerprint = crypto.fingerprint(payload)
    row.state, row.last_error = ConnectionState.ACTIVE, ""
    row.version = (previous.version + 1) if previous else 1
    row.connected_by, row.connected_at, row.refreshed_at = user, timezone.now(), None
    for name, value in values.items():
        setattr(row, name, value)
    row.save()
    if own and server.check_as_id is None and is_admin(server=server, user=user):
        ExternalMcpServer.objects.filter(pk=server.pk).update(check_as=user)
        server.check_as = user
    _audit(server=server, actor=user, action=AuditAction.CONNECT,
           changes={"own": own, "fingerprint": row.fingerprint, **({"scope": row.scope} if row.scope else {})})
    status_follow_auth(server=server, reason=f"Connected by {user.get_username()}.")
    invalidation.announce_change()
    transaction.on_commit(lambda: queue_check(server.pk))
    return row


@transaction.atomic
def connection_save_tokens(*, server: ExternalMcpServer, user: AbstractBaseUser, own: bool, access_token: str,
                           refresh_token: str | None, expires_at: Any, scope: str, subject: str = "",
                           client: dict[str, Any] | None = None) -> Connection:
    """``client``: the client TwinMCP registered and obtained the grant as; it is kept with the
    tokens because the grant is only renewed or revoked as that client (a later Connect may
    register another)."""
    payload: dict[str, Any] = {"access_token": access_token,
                               **({"refresh_token": refresh_token} if refresh_token else {}),
                               **({"client": client} if client else {})}
    return _save(server=server, user=user, own=own, payload=payload,
                 values={"expires_at": expires_at, "scope": scope[:1000], "subject": subject[:200]})


@transaction.atomic
def connection_save_secret(*, server: ExternalMcpServer, user: AbstractBaseUser, credentials: Any) -> Connection:
    """A member's own secret for a per-user server (validated as the server's auth type requires)."""
    clean = validate_credentials(server.auth_type, credentials)
    assert clean is not None  # per-user servers have an auth type with credentials
    return _save(server=server, user=user, own=True, payload=clean.payload, values={
        "expires_at": clean.cert_not_after, "subject": clean.cert_subject})


@transaction.atomic
def connection_delete(*, connection: Connection, actor: AbstractBaseUser | None) -> None:
    """Disconnect: the tokens are revoked at the authorization server (queued), the row goes."""
    server = ExternalMcpServer.objects.select_for_update().get(pk=connection.server_id)
    row = Connection.objects.filter(pk=connection.pk).first()
    if row is None:
        return
    _revoke(server, row)
    row.delete()
    if server.per_user and server.check_as_id == row.user_id:
        server.check_as = None
        server.save(update_fields=["check_as"])
    _audit(server=server, actor=actor, action=AuditAction.DISCONNECT,
           changes={"own": row.user_id is not None, "user": row.user_id})
    status_follow_auth(server=server, reason="The connection health checks used was removed.")
    invalidation.announce_change()


def status_follow_auth(*, server: ExternalMcpServer, reason: str) -> None:
    """A server whose calls need a connection nobody made cannot be checked: it shows so; once its
    authentication no longer needs one, it is checked again."""
    if server.status == ServerStatus.DISABLED:
        return
    if server.connects and checks_use(server) is None:
        transition(server=server, new=ServerStatus.NEEDS_AUTH, reason=reason)
    elif server.status == ServerStatus.NEEDS_AUTH:
        transition(server=server, new=ServerStatus.NEW, reason=reason)


def connections_drop(*, server: ExternalMcpServer) -> int:
    """Every connection and what was discovered, when the server changes what they were for (its
    auth type, credential mode or origin); inside the caller's transaction, before the OAuth
    client row goes (the revocations need it)."""
    rows = list(Connection.objects.filter(server=server))
    for row in rows:
        _revoke(server, row)
    Connection.objects.filter(server=server).delete()
    OAuthClient.objects.filter(server=server).delete()
    server.check_as = None
    return len(rows)


def connection_needs_reauth(*, connection: Connection, reason: str) -> bool:
    """Mark a connection whose grant the authorization server refused for good; whoever must
    reconnect is told once (the member for their own, the admins for the workspace's)."""
    with transaction.atomic():
        if not Connection.objects.filter(pk=connection.pk, state=ConnectionState.ACTIVE).update(
                state=ConnectionState.NEEDS_REAUTH, last_error=reason[:2000]):
            return False
        server = ExternalMcpServer.objects.get(pk=connection.server_id)
        _audit(server=server, actor=None, action=AuditAction.REAUTH,
               changes={"own": connection.user_id is not None, "user": connection.user_id})
        title = f"Reconnect {server.name}"
        dedup_key = f"{NotificationKind.REAUTH}:{connection.pk}:{connection.version}"
        if connection.user_id is not None:
            body = (f"Your connection to {server.name} was refused by its authorization server ({reason}). Connect "
                    "your account again on the server's page; until then your calls to it are refused.")
            notify_users(user_ids=[connection.user_id], workspace_id=server.workspace_id, server=server,
                         kind=NotificationKind.REAUTH, title=title, body=body, dedup_key=dedup_key)
        else:
            body = (f"The workspace's connection to {server.name} was refused by its authorization server ({reason}). "
                    "An admin must connect it again on the server's page; until then every call to it is refused.")
            notify_admins(workspace_id=server.workspace_id, server=server, kind=NotificationKind.REAUTH, title=title,
                          body=body, dedup_key=dedup_key)
        status_follow_auth(server=server, reason=f"The connection health checks use needs re-authorization: {reason}")
    invalidation.announce_change()
    return True


@dataclass(frozen=True)
class Panel:
    """What a server's page shows of its connections to ``viewer``: never a token."""

    needed: bool
    """The server's calls need a connection (``ExternalMcpServer.connects``)."""
    oauth: bool
    own: bool
    """Members connect their own (per-user credentials)."""
    mine: Connection | None
    """The connection the viewer's calls use: their own, or the workspace's."""
    others: list[Connection]
    """Admins only: every connection but ``mine``."""
    checks_as: str
    can_connect: bool
    sign_in_at: str
    """The authorization server Connect sends the browser to, once known."""


def panel(*, server: ExternalMcpServer, viewer: Any, can_admin: bool) -> Panel:
    if not server.connects:
        return Panel(needed=False, oauth=False, own=False, mine=None, others=[], checks_as="", can_connect=False,
                     sign_in_at="")
    rows = list(server.connections.select_related("user", "connected_by").order_by("connected_at"))
    owner_id = viewer.pk if server.per_user else None
    mine = next((row for row in rows if row.user_id == owner_id), None)
    others = [row for row in rows if row is not mine] if can_admin else []
    checks_as = server.check_as.get_username() if server.per_user and server.check_as_id else ""
    found = OAuthClient.objects.filter(server=server).values_list("issuer", flat=True).first()
    return Panel(needed=True, oauth=server.auth_type == AuthType.OAUTH2, own=server.per_user, mine=mine,
                 others=others, checks_as=checks_as, can_connect=server.per_user or can_admin, sign_in_at=found or "")
