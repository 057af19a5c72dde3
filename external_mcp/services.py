"""Writes to the server registry. Every change validates, encrypts and leaves an audit event."""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import datetime
from typing import Any
from urllib.parse import urlsplit

from django.conf import settings
from django.contrib.auth.models import AbstractBaseUser
from django.core.exceptions import ValidationError
from django.db import IntegrityError, models, transaction
from django.utils import timezone

from external_mcp import catalog, crypto
from external_mcp.choices import AuditAction, AuthType, CredentialMode, ServerStatus, Transport
from external_mcp.connections import connections_drop, status_follow_auth
from external_mcp.credentials import CleanCredentials, validate_credentials
from external_mcp.exposed_names import derive_prefix, prefix_problem
from external_mcp.models import (
    PREFIX_CONSTRAINT,
    AuditEvent,
    Connection,
    ExternalMcpCredential,
    ExternalMcpServer,
    OAuthClient,
    OAuthPending,
    OAuthRevocation,
)
from external_mcp.queue import queue_check
from external_mcp.status import transition
from external_mcp.urlpolicy import UrlPolicyError, validate_url
from twinmcp import invalidation
from twinmcp.api_errors import LimitReached
from twinmcp.models import Workspace
from usage.models import ExportDestination

logger = logging.getLogger(__name__)

MAX_TAGS = 20
MAX_TAG_CHARS = 40
EDITABLE_FIELDS = ("name", "prefix", "base_url", "description", "tags", "enabled", "transport",
                   "check_interval_seconds")

MOVE_NEEDS_CREDENTIALS = (
    "The new URL is on another origin (scheme, host or port): enter the secret again for the new host. "
    "The stored one is never sent there, and the server's tools go back to pending for approval."
)


class CredentialUnavailable(Exception):
    """The stored credential cannot be decrypted with the current key ring."""


def _clean_url(base_url: str) -> str:
    try:
        return validate_url(base_url).url
    except UrlPolicyError as exc:
        raise ValidationError({"base_url": [str(exc)]}) from None


def _clean_tags(tags: Any) -> list[str]:
    if tags in (None, ""):
        return []
    if isinstance(tags, str):
        tags = tags.split(",")
    if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
        raise ValidationError({"tags": ["A list of strings is expected."]})
    clean: list[str] = []
    for tag in (t.strip().lower() for t in tags):
        if not tag:
            continue
        if len(tag) > MAX_TAG_CHARS or "," in tag:
            raise ValidationError({"tags": [f"Tags are at most {MAX_TAG_CHARS} characters, without commas."]})
        if tag not in clean:
            clean.append(tag)
    if len(clean) > MAX_TAGS:
        raise ValidationError({"tags": [f"At most {MAX_TAGS} tags."]})
    return clean


def _clean_name(name: Any) -> str:
    if not isinstance(name, str) or not name.strip():
        raise ValidationError({"name": ["This field is required."]})
    name = name.strip()
    if len(name) > 100:
        raise ValidationError({"name": ["At most 100 characters."]})
    return name


def _clean_interval(value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 15 <= value <= 86400:
        raise ValidationError({"check_interval_seconds": ["A whole number of seconds from 15 to 86400."]})
    return value


def _apply_fields(server: ExternalMcpServer, fields: dict[str, Any]) -> dict[str, Any]:
    """Set validated editable fields; return the non-secret changes for the audit trail."""
    changes: dict[str, Any] = {}
    for key, value in fields.items():
        if key not in EDITABLE_FIELDS:
            raise ValidationError({key: ["This field cannot be changed here."]})
        if key == "name":
            value = _clean_name(value)
        elif key == "prefix":
            value = _clean_prefix(value)
        elif key == "base_url":
            value = _clean_url(value)
        elif key == "tags":
            value = _clean_tags(value)
            server.tags_index = "," + ",".join(value) + "," if value else ""
        elif key == "description":
            value = str(value or "")[:2000]
        elif key == "enabled":
            if not isinstance(value, bool):
                raise ValidationError({"enabled": ["Must be true or false."]})
        elif key == "transport":
            if value not in Transport.values:
                raise ValidationError({"transport": [f"Choose one of {', '.join(Transport.values)}."]})
        elif key == "check_interval_seconds":
            value = _clean_interval(value)
        if getattr(server, key) != value:
            changes[key] = value
            setattr(server, key, value)
    return changes


def _clean_auth(auth_type: Any, credentials: Any, mode: str = CredentialMode.SHARED) -> CleanCredentials | None:
    """The server's own credentials. With per-user credentials each member gives their secret
    (``external_mcp.connections``), so the server stores none, except an OAuth client's id."""
    if auth_type not in AuthType.values:
        raise ValidationError({"auth_type": [f"Choose one of {', '.join(AuthType.values)}."]})
    if mode not in CredentialMode.values:
        raise ValidationError({"credential_mode": [f"Choose one of {', '.join(CredentialMode.values)}."]})
    if mode == CredentialMode.PER_USER and auth_type != AuthType.OAUTH2:
        if auth_type == AuthType.NONE:
            raise ValidationError({"credential_mode": ["A server without authentication has no credentials to "
                                                       "give per user."]})
        if credentials not in (None, {}, ""):
            raise ValidationError({"credentials": ["With per-user credentials each member enters their own on the "
                                                   "server's page; the server stores none."]})
        return None
    if auth_type == AuthType.OAUTH2 and credentials in (None, ""):
        credentials = {}
    clean = validate_credentials(auth_type, credentials)
    return clean if clean is None or clean.payload else None


def initial_status(server: ExternalMcpServer) -> str:
    """A server whose calls need an account nobody has connected yet cannot be checked."""
    if not server.enabled:
        return ServerStatus.DISABLED
    return ServerStatus.NEEDS_AUTH if server.connects else ServerStatus.NEW


def _store_credentials(
    *, server: ExternalMcpServer, clean: CleanCredentials | None, expires_at: datetime | None, rotated: bool
) -> None:
    if clean is None:
        ExternalMcpCredential.objects.filter(server=server).delete()
        return
    now = timezone.now()
    values = {
        "ciphertext": crypto.encrypt_json(clean.payload, context=str(server.pk)),
        "key_id": crypto.current_key_id(),
        "fingerprint": crypto.fingerprint(clean.payload),
        "rotated_at": now if rotated else None,
        "expires_at": expires_at,
        "cert_subject": clean.cert_subject,
        "cert_issuer": clean.cert_issuer,
        "cert_not_after": clean.cert_not_after,
    }
    ExternalMcpCredential.objects.update_or_create(server=server, defaults=values)


def _audit(*, server: ExternalMcpServer, actor: AbstractBaseUser | None, action: str, changes: dict) -> None:
    AuditEvent.objects.create(
        workspace_id=server.workspace_id,
        server=server if action != AuditAction.DELETE else None,
        server_name=server.name,
        actor=actor,
        action=action,
        changes=changes,
    )


def _clean_prefix(prefix: Any) -> str:
    problem = prefix_problem(prefix) if isinstance(prefix, str) else "A prefix is a string."
    if problem:
        raise ValidationError({"prefix": [problem]})
    return prefix


def _taken(exc: IntegrityError) -> ValidationError:
    """The unique constraint a save broke, as the field an admin must change."""
    if PREFIX_CONSTRAINT in str(exc):
        return ValidationError({"prefix": ["Another server of this workspace has this prefix."]})
    return ValidationError({"name": ["A server with this name already exists in this workspace."]})


def _free_prefix(*, workspace: Workspace, name: str) -> str:
    taken = ExternalMcpServer.objects.filter(workspace=workspace).values_list("prefix", flat=True)
    return derive_prefix(name, set(taken))


@transaction.atomic
def server_create(
    *,
    workspace: Workspace,
    actor: AbstractBaseUser | None,
    name: str,
    base_url: str,
    auth_type: str = AuthType.NONE,
    credentials: dict | None = None,
    credentials_expires_at: datetime | None = None,
    description: str = "",
    tags: list[str] | None = None,
    enabled: bool = True,
    transport: str = Transport.AUTO,
    check_interval_seconds: int | None = None,
    prefix: str | None = None,
    credential_mode: str = CredentialMode.SHARED,
) -> ExternalMcpServer:
    """``prefix`` defaults to one derived from the name, unique in the workspace."""
    server = ExternalMcpServer(workspace=workspace, created_by=actor)
    changes = _apply_fields(
        server,
        {
            "name": name, "base_url": base_url, "description": description, "tags": tags or [],
            "enabled": enabled, "transport": transport,
            "check_interval_seconds": check_interval_seconds or settings.EXTERNAL_MCP_HEALTH_INTERVAL_SECONDS,
            **({} if prefix is None else {"prefix": prefix}),
        },
    )
    clean = _clean_auth(auth_type, credentials, credential_mode)
    server.auth_type, server.credential_mode = auth_type, credential_mode
    server.status = initial_status(server)
    # Lock the workspace row so two concurrent creations cannot both pass the cap (or take one prefix).
    Workspace.objects.select_for_update().filter(pk=workspace.pk).first()
    if ExternalMcpServer.objects.filter(workspace=workspace).count() >= settings.EXTERNAL_MCP_MAX_PER_ORG:
        raise LimitReached(
            f"This workspace already has {settings.EXTERNAL_MCP_MAX_PER_ORG} servers, the maximum "
            "(EXTERNAL_MCP_MAX_PER_ORG); delete one first."
        )
    if prefix is None:
        server.prefix = changes["prefix"] = _free_prefix(workspace=workspace, name=server.name)
    try:
        with transaction.atomic():
            server.save()
    except IntegrityError as exc:
        raise _taken(exc) from None
    _store_credentials(server=server, clean=clean, expires_at=credentials_expires_at, rotated=False)
    _audit(server=server, actor=actor, action=AuditAction.CREATE,
           changes={**changes, "auth_type": auth_type, "credential_mode": credential_mode})
    transaction.on_commit(lambda: queue_check(server.pk))
    return server


def _origin(url: str) -> tuple[str, str, int | None]:
    """(scheme, host, port) of a URL as ``validate_url`` stores it: lower case, IDNA, the default
    port left out; anything unreadable compares as its whole network location."""
    parts = urlsplit(url)
    try:
        return parts.scheme, parts.hostname or parts.netloc, parts.port
    except ValueError:
        return parts.scheme, parts.netloc, None


def _moves(old_url: str, new_url: str) -> bool:
    """The one rule: a server moves when its URL's scheme, host or port changes (a path does not)."""
    return _origin(old_url) != _origin(new_url)


def server_moves(*, server: ExternalMcpServer, base_url: str) -> bool:
    """Whether saving ``base_url`` would move the server to another origin, so its credentials must
    be given again (forms ask for them up front). A URL the policy refuses is no move: the update
    reports its own error."""
    try:
        return _moves(server.base_url, _clean_url(base_url))
    except ValidationError:
        return False


@transaction.atomic
def server_update(
    *, server: ExternalMcpServer, actor: AbstractBaseUser | None, **fields: Any
) -> ExternalMcpServer:
    """Update non-secret fields. Changing ``auth_type`` needs the new type's ``credentials``; so does
    moving the server to another origin while it has credentials (they were given for the old host,
    and the proxy would send them to the new one). A move also returns every tool to pending."""
    server = ExternalMcpServer.objects.select_for_update().get(pk=server.pk)
    auth_type = fields.pop("auth_type", None)
    mode = fields.pop("credential_mode", None)
    credentials = fields.pop("credentials", None)
    expires_at = fields.pop("credentials_expires_at", None)
    old_url = server.base_url
    changes = _apply_fields(server, fields)
    moved = "base_url" in changes and _moves(old_url, server.base_url)
    if "transport" in changes or "base_url" in changes:
        server.transport_found = ""  # what answered there before says nothing of what answers now
    if "enabled" in changes or "base_url" in changes or "transport" in changes:
        server.next_check_at = timezone.now()
    new_auth = auth_type is not None and auth_type != server.auth_type
    new_mode = mode is not None and mode != server.credential_mode
    if new_auth or new_mode or (moved and server.has_credentials):
        if not (new_auth or new_mode) and credentials is None:
            raise ValidationError({"credentials": [MOVE_NEEDS_CREDENTIALS]})
        clean = _clean_auth(auth_type if new_auth else server.auth_type, credentials,
                            mode if new_mode else server.credential_mode)
        if new_auth:
            server.auth_type = changes["auth_type"] = auth_type
        if new_mode:
            server.credential_mode = changes["credential_mode"] = mode
        _store_credentials(server=server, clean=clean, expires_at=expires_at, rotated=True)
        if clean is not None:
            changes["fingerprint"] = crypto.fingerprint(clean.payload)
    elif credentials is not None:
        raise ValidationError({"credentials": ["Replace secrets with PUT …/credentials/."]})
    # Connections were made for the old auth type, mode or host: none is sent anywhere else.
    if (new_auth or new_mode or moved) and (dropped := connections_drop(server=server)):
        changes["connections_dropped"] = dropped
    try:
        with transaction.atomic():
            server.save()
    except IntegrityError as exc:
        raise _taken(exc) from None
    if new_auth or new_mode or moved:
        status_follow_auth(server=server, reason="Authentication changed.")
    if moved:
        changes["tools_reset"] = catalog.tools_reset_approvals(server=server)
    if "enabled" in changes:
        reason = f"{'Enabled' if server.enabled else 'Disabled'} by {getattr(actor, 'username', 'the system')}."
        transition(server=server, new=ServerStatus.NEW if server.enabled else ServerStatus.DISABLED, reason=reason)
    if changes:
        _audit(server=server, actor=actor, action=AuditAction.UPDATE, changes=changes)
        invalidation.announce_change()
        transaction.on_commit(lambda: queue_check(server.pk))
    return server


@transaction.atomic
def server_delete(*, server: ExternalMcpServer, actor: AbstractBaseUser | None) -> None:
    _audit(server=server, actor=actor, action=AuditAction.DELETE, changes={"id": str(server.pk)})
    connections_drop(server=server)
    server.delete()
    invalidation.announce_change()


@transaction.atomic
def credentials_rotate(
    *,
    server: ExternalMcpServer,
    actor: AbstractBaseUser | None,
    credentials: Any,
    auth_type: str | None = None,
    expires_at: datetime | None = None,
) -> ExternalMcpServer:
    """Replace the secret. The old ciphertext is overwritten in place: no copy is kept."""
    server = ExternalMcpServer.objects.select_for_update().get(pk=server.pk)
    auth_type = auth_type or server.auth_type
    clean = _clean_auth(auth_type, credentials, server.credential_mode)
    if clean is None and auth_type == server.auth_type and auth_type != AuthType.OAUTH2:
        raise ValidationError({"credentials": [f"auth_type {auth_type!r} has no server credentials to rotate."]})
    changes: dict[str, Any] = {}
    # Grants belong to the client they were given to: a new client id (not a new secret) ends them.
    new_client = auth_type == AuthType.OAUTH2 and (credentials_payload(server=server) or {}).get("client_id") != (
        clean.payload.get("client_id") if clean else None)
    if (auth_type != server.auth_type or new_client) and (dropped := connections_drop(server=server)):
        changes["connections_dropped"] = dropped
    if auth_type != server.auth_type:
        changes["auth_type"] = auth_type
        server.auth_type = auth_type
    if server.error_message.startswith("Stored credentials"):
        server.error_message = ""
    server.save()
    status_follow_auth(server=server, reason="Credentials changed.")
    _store_credentials(server=server, clean=clean, expires_at=expires_at, rotated=True)
    if clean is not None:
        changes["fingerprint"] = crypto.fingerprint(clean.payload)
    _audit(server=server, actor=actor, action=AuditAction.ROTATE, changes=changes)
    invalidation.announce_change()
    transaction.on_commit(lambda: queue_check(server.pk))
    return server


def credentials_payload(*, server: ExternalMcpServer) -> dict[str, str] | None:
    """The decrypted payload, for outbound calls only. A credential no key can decrypt marks
    the server with a clear error instead of failing the caller with a 500."""
    if server.auth_type == AuthType.NONE:
        return None
    credential = ExternalMcpCredential.objects.filter(server=server).first()
    if credential is None and server.auth_type == AuthType.OAUTH2:
        return {}  # no client entered: TwinMCP registers its own at the first Connect
    if credential is None:
        raise CredentialUnavailable("No credentials are stored for this server; set them again.")
    try:
        return crypto.decrypt_json(credential.ciphertext, context=str(server.pk))
    except crypto.DecryptionError as exc:
        message = f"Stored credentials cannot be decrypted ({exc}); set them again or restore the key."
        ExternalMcpServer.objects.filter(pk=server.pk).update(error_message=message)
        logger.error("credential decryption failed for server %s: %s", server.pk, exc)
        raise CredentialUnavailable(message) from None


def _encrypted_fields() -> list[tuple[type[models.Model], str, Callable[[Any], str]]]:
    """Every ciphertext TwinMCP stores: its model, its field and what it is bound to."""
    return [
        (ExternalMcpCredential, "ciphertext", lambda row: str(row.server_id)),
        (Connection, "ciphertext", lambda row: row.context),
        (OAuthClient, "registration", lambda row: row.context),
        (OAuthPending, "verifier", lambda row: row.context),
        (OAuthRevocation, "ciphertext", lambda row: row.context),
        (ExportDestination, "password_ciphertext", lambda row: row.context),
    ]


def credentials_reencrypt_all(*, batch_size: int = 200) -> tuple[int, int]:
    """Re-encrypt every secret made by an older key (credentials, connections, OAuth clients,
    pending authorizations, revocations, export destinations) with the first key of the ring.

    Returns (changed, still_old): rows that could not be decrypted stay on their old key."""
    current = crypto.current_key_id()
    changed = still_old = 0
    for model, field, context_of in _encrypted_fields():
        failed_ids: set[Any] = set()
        stored = model.objects.exclude(**{field: ""}).exclude(key_id=current)
        while True:
            with transaction.atomic():
                batch = list(stored.select_for_update(skip_locked=True).exclude(pk__in=failed_ids)
                             .order_by("pk")[:batch_size])
                if not batch:
                    break
                for row in batch:
                    server = getattr(row, "server", None) if hasattr(row, "server_id") else None
                    try:
                        setattr(row, field, crypto.reencrypt(getattr(row, field), context=context_of(row)))
                    except crypto.DecryptionError as exc:
                        failed_ids.add(row.pk)
                        if server is not None:
                            _audit(server=server, actor=None, action=AuditAction.DECRYPT_FAILED,
                                   changes={"error": str(exc)})
                        continue
                    row.key_id = current
                    row.save(update_fields=[field, "key_id"])
                    if model is ExternalMcpCredential:
                        _audit(server=server, actor=None, action=AuditAction.REENCRYPT, changes={"key_id": current})
                    changed += 1
        still_old += stored.count()
    return changed, still_old
