"""Writes for the core app: workspaces, memberships, plans and API keys."""

from __future__ import annotations

from datetime import datetime

from django.contrib.auth import get_user_model
from django.contrib.auth.models import AbstractBaseUser
from django.core.exceptions import ValidationError
from django.db import IntegrityError, transaction
from django.utils import timezone
from django.utils.text import slugify

from twinmcp import invalidation
from twinmcp.apikeys import generate_key
from twinmcp.models import ApiKey, Membership, Plan, PlanCode, Profile, Role, Workspace

User = get_user_model()


def plan_get(*, code: str) -> Plan:
    defaults = {
        PlanCode.FREE: {"name": "Free", "capped": True},
        PlanCode.PRO: {"name": "Pro", "capped": False},
    }
    if code not in defaults:
        raise ValidationError({"plan": f"Unknown plan {code!r}; choose free or pro."})
    plan, _ = Plan.objects.get_or_create(code=code, defaults=defaults[code])
    return plan


def profile_ensure(*, user: AbstractBaseUser) -> Profile:
    profile = Profile.objects.filter(user=user).select_related("plan").first()
    if profile is None:
        profile, _ = Profile.objects.get_or_create(user=user, defaults={"plan": plan_get(code=PlanCode.FREE)})
    return profile


def profile_set_plan(*, user: AbstractBaseUser, code: str) -> Profile:
    plan = plan_get(code=code)
    profile = profile_ensure(user=user)
    if profile.plan_id != plan.pk:
        profile.plan = plan
        profile.save(update_fields=["plan"])
        invalidation.announce_change()
    return profile


def workspace_create(*, slug: str, name: str = "") -> Workspace:
    if slugify(slug) != slug or not slug:
        raise ValidationError({"slug": f"{slug!r} is not a valid slug (lowercase letters, digits, hyphens)."})
    try:
        with transaction.atomic():
            return Workspace.objects.create(slug=slug, name=name or slug)
    except IntegrityError:
        raise ValidationError({"slug": f"Workspace {slug!r} already exists."}) from None


def member_add(*, workspace: Workspace, user: AbstractBaseUser, role: str) -> Membership:
    if role not in Role.values:
        raise ValidationError({"role": f"Unknown role {role!r}; choose admin or member."})
    profile_ensure(user=user)
    membership, created = Membership.objects.get_or_create(
        user=user, workspace=workspace, defaults={"role": role}
    )
    if not created and membership.role != role:
        membership.role = role
        membership.save(update_fields=["role"])
    return membership


def member_remove(*, workspace: Workspace, user: AbstractBaseUser) -> None:
    Membership.objects.filter(workspace=workspace, user=user).delete()
    invalidation.announce_change()


def api_key_create(
    *,
    user: AbstractBaseUser,
    workspace: Workspace,
    name: str = "default",
    expires_at: datetime | None = None,
) -> tuple[ApiKey, str]:
    """Create a key and return it with the raw value, which is never retrievable again."""
    if not Membership.objects.filter(user=user, workspace=workspace).exists():
        raise ValidationError({"workspace": "You are not a member of this workspace."})
    if expires_at is not None and expires_at <= timezone.now():
        raise ValidationError({"expires_at": "Must be in the future."})
    new = generate_key()
    key = ApiKey.objects.create(
        user=user,
        workspace=workspace,
        name=name or "default",
        prefix=new.prefix,
        key_hash=new.key_hash,
        expires_at=expires_at,
    )
    return key, new.raw


def api_key_revoke(*, key: ApiKey) -> ApiKey:
    if key.revoked_at is None:
        key.revoked_at = timezone.now()
        key.save(update_fields=["revoked_at"])
        invalidation.announce_change()
    return key
