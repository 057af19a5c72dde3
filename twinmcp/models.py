"""Tenancy (workspaces, memberships), plans and the API keys agents authenticate with."""

from __future__ import annotations

import uuid

from django.conf import settings
from django.db import models
from django.utils import timezone


class Workspace(models.Model):
    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    slug = models.SlugField(max_length=64, unique=True)
    name = models.CharField(max_length=200)
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["slug"]

    def __str__(self) -> str:
        return self.slug


class Role(models.TextChoices):
    ADMIN = "admin", "Admin"
    MEMBER = "member", "Member"


class MembershipQuerySet(models.QuerySet["Membership"]):
    def admins(self) -> MembershipQuerySet:
        return self.filter(role=Role.ADMIN)

    def of_user(self, user: object) -> MembershipQuerySet:
        return self.filter(user=user)


class Membership(models.Model):
    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="memberships")
    workspace = models.ForeignKey(Workspace, on_delete=models.CASCADE, related_name="memberships")
    role = models.CharField(max_length=16, choices=Role.choices, default=Role.MEMBER)
    created_at = models.DateTimeField(default=timezone.now)

    objects = MembershipQuerySet.as_manager()

    class Meta:
        constraints = [models.UniqueConstraint(fields=["user", "workspace"], name="membership_unique")]

    def __str__(self) -> str:
        return f"{self.user} in {self.workspace} ({self.role})"


class PlanCode(models.TextChoices):
    FREE = "free", "Free"
    PRO = "pro", "Pro"


class Plan(models.Model):
    """A billing plan. The free plan's cap is EXTERNAL_MCP_FREE_DAILY_LIMIT, read live so
    operators change it with one variable; ``daily_limit`` overrides it when set."""

    code = models.CharField(max_length=32, unique=True)
    name = models.CharField(max_length=100)
    capped = models.BooleanField(default=True, help_text="Whether a daily tool-call cap applies.")
    daily_limit = models.PositiveIntegerField(
        null=True, blank=True, help_text="Calls per UTC day; empty means EXTERNAL_MCP_FREE_DAILY_LIMIT."
    )

    def __str__(self) -> str:
        return self.name

    @property
    def effective_daily_limit(self) -> int | None:
        if not self.capped:
            return None
        return self.daily_limit if self.daily_limit is not None else settings.EXTERNAL_MCP_FREE_DAILY_LIMIT


class Profile(models.Model):
    """Per-user facts that are not identity: the plan and the display timezone."""

    user = models.OneToOneField(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="profile")
    plan = models.ForeignKey(Plan, on_delete=models.PROTECT, related_name="profiles")
    timezone = models.CharField(max_length=64, default="UTC")

    def __str__(self) -> str:
        return f"{self.user} ({self.plan.code})"


class ApiKeyQuerySet(models.QuerySet["ApiKey"]):
    def active(self) -> ApiKeyQuerySet:
        now = timezone.now()
        return self.filter(revoked_at__isnull=True).filter(
            models.Q(expires_at__isnull=True) | models.Q(expires_at__gt=now)
        )


class ApiKey(models.Model):
    """A TwinMCP key. Only the SHA-256 of the key is stored; ``prefix`` is for display."""

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="api_keys")
    workspace = models.ForeignKey(Workspace, on_delete=models.CASCADE, related_name="api_keys")
    name = models.CharField(max_length=100, default="default")
    prefix = models.CharField(max_length=16)
    key_hash = models.CharField(max_length=64, unique=True)
    created_at = models.DateTimeField(default=timezone.now)
    last_used_at = models.DateTimeField(null=True, blank=True)
    expires_at = models.DateTimeField(null=True, blank=True)
    revoked_at = models.DateTimeField(null=True, blank=True)

    objects = ApiKeyQuerySet.as_manager()

    class Meta:
        ordering = ["-created_at"]

    def __str__(self) -> str:
        return f"{self.prefix}… ({self.name})"

    @property
    def is_active(self) -> bool:
        now = timezone.now()
        return self.revoked_at is None and (self.expires_at is None or self.expires_at > now)


class FlagWorkspace(models.Model):
    """Switches a waffle flag on for one workspace (gradual roll-out per organisation)."""

    flag = models.ForeignKey("waffle.Flag", on_delete=models.CASCADE, related_name="workspace_links")
    workspace = models.ForeignKey(Workspace, on_delete=models.CASCADE, related_name="flag_links")

    class Meta:
        constraints = [models.UniqueConstraint(fields=["flag", "workspace"], name="flag_workspace_unique")]

    def __str__(self) -> str:
        return f"{self.flag_id} on for {self.workspace_id}"
