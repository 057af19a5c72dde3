"""Writes to a workspace's membership from the members page and API: add, create, change role, remove.

Each write locks the workspace row first. That is the one serialisation point of its membership, so
the last-admin guard holds under concurrency: two admins demoting each other at the same moment run
one after the other, and the second sees that only one admin is left. Every write records an
``AuditEvent`` (no server) in the same transaction.
"""

from __future__ import annotations

import secrets
from typing import Any

from django.contrib.auth import get_user_model, password_validation
from django.contrib.auth.models import AbstractBaseUser
from django.core.exceptions import ValidationError
from django.db import transaction
from django.db.models import Q
from django.utils import timezone

from external_mcp.choices import AuditAction
from external_mcp.connections import connection_delete
from external_mcp.models import AuditEvent, Connection
from twinmcp import invalidation
from twinmcp.models import ApiKey, Membership, Role, Workspace
from twinmcp.services import profile_ensure

User = get_user_model()

GENERATED_PASSWORD_BYTES = 12
USER_ID_MAX = 2**31 - 1  # auth_user.id is a PostgreSQL integer: a larger id in a URL names no one
LAST_ADMIN = "A workspace must keep at least one admin: make another member admin first."


def _audit(*, workspace: Workspace, actor: AbstractBaseUser | None, action: str, changes: dict[str, Any]) -> None:
    AuditEvent.objects.create(workspace=workspace, server=None, server_name="", actor=actor, action=action,
                              changes=changes)


def _lock(workspace: Workspace) -> Workspace:
    return Workspace.objects.select_for_update().get(pk=workspace.pk)


def _check_role(role: str) -> None:
    if role not in Role.values:
        raise ValidationError({"role": f"Unknown role {role!r}; choose admin or member."})


def user_find(*, identifier: str) -> AbstractBaseUser:
    """The active user whose username or e-mail is ``identifier`` (case-insensitive e-mail)."""
    identifier = identifier.strip()
    if not identifier:
        raise ValidationError({"user": "Enter a username or an e-mail address."})
    found = list(User.objects.filter(Q(username=identifier) | Q(email__iexact=identifier), is_active=True)[:2])
    if len(found) != 1:
        reason = "No active user" if not found else "Several users"
        raise ValidationError({"user": f"{reason} with username or e-mail {identifier!r}."})
    return found[0]


@transaction.atomic
def membership_add(*, workspace: Workspace, actor: AbstractBaseUser | None, user: AbstractBaseUser,
                   role: str) -> Membership:
    _check_role(role)
    _lock(workspace)
    if Membership.objects.filter(workspace=workspace, user=user).exists():
        raise ValidationError({"user": f"{user.get_username()} is already a member of {workspace.name}."})
    profile_ensure(user=user)
    membership = Membership.objects.create(workspace=workspace, user=user, role=role)
    _audit(workspace=workspace, actor=actor, action=AuditAction.MEMBER_ADD,
           changes={"user": user.get_username(), "user_id": user.pk, "role": role})
    return membership


@transaction.atomic
def membership_add_new_user(*, workspace: Workspace, actor: AbstractBaseUser | None, username: str, email: str,
                            password: str, role: str) -> tuple[Membership, str | None]:
    """Create the user and make them a member. With no password one is generated and returned,
    because the admin must hand it over once; a chosen one is never returned."""
    _check_role(role)
    username = username.strip()
    if not username:
        raise ValidationError({"username": "Enter a username."})
    if User.objects.filter(username=username).exists():
        raise ValidationError({"username": f"User {username!r} already exists; add them as an existing user."})
    email = User.objects.normalize_email(email.strip()) if email.strip() else ""
    if email and User.objects.filter(email__iexact=email).exists():
        raise ValidationError({"email": f"A user with e-mail {email} already exists."})
    generated = None if password else secrets.token_urlsafe(GENERATED_PASSWORD_BYTES)
    user = User(username=username, email=email)
    try:
        password_validation.validate_password(password or generated, user)
    except ValidationError as exc:
        raise ValidationError({"password": exc.messages}) from None
    user.set_password(password or generated)
    user.full_clean(exclude=["password"])
    user.save()
    return membership_add(workspace=workspace, actor=actor, user=user, role=role), generated


@transaction.atomic
def membership_role_change(*, membership: Membership, actor: AbstractBaseUser | None, role: str) -> Membership:
    _check_role(role)
    _lock(membership.workspace)
    current = Membership.objects.select_related("user", "workspace").filter(pk=membership.pk).first()
    if current is None:
        raise ValidationError({"user": "This user is no longer a member of the workspace."})
    if current.role == role:
        return current
    if current.role == Role.ADMIN and not Membership.objects.filter(
            workspace_id=current.workspace_id).admins().exclude(pk=current.pk).exists():
        raise ValidationError({"role": LAST_ADMIN})
    old = current.role
    current.role = role
    current.save(update_fields=["role"])
    _audit(workspace=current.workspace, actor=actor, action=AuditAction.MEMBER_ROLE,
           changes={"user": current.user.get_username(), "user_id": current.user_id, "role": [old, role]})
    invalidation.announce_change()
    return current


@transaction.atomic
def membership_remove(*, membership: Membership, actor: AbstractBaseUser | None) -> dict[str, int]:
    """Remove the member, revoke their keys of this workspace and disconnect their own accounts of
    its servers; the gateways forget the cached keys once this commits. Returns what was undone."""
    _lock(membership.workspace)
    current = Membership.objects.select_related("user", "workspace").filter(pk=membership.pk).first()
    if current is None:
        return {"keys": 0, "connections": 0}
    if current.role == Role.ADMIN and not Membership.objects.filter(
            workspace_id=current.workspace_id).admins().exclude(pk=current.pk).exists():
        raise ValidationError({"user": LAST_ADMIN})
    keys = ApiKey.objects.filter(user_id=current.user_id, workspace_id=current.workspace_id).active().update(
        revoked_at=timezone.now())
    own = list(Connection.objects.filter(user_id=current.user_id, server__workspace_id=current.workspace_id))
    for connection in own:
        connection_delete(connection=connection, actor=actor)
    current.delete()
    _audit(workspace=current.workspace, actor=actor, action=AuditAction.MEMBER_REMOVE,
           changes={"user": current.user.get_username(), "user_id": current.user_id, "role": current.role,
                    "keys_revoked": keys, "connections_removed": len(own)})
    invalidation.announce_change()
    return {"keys": keys, "connections": len(own)}
