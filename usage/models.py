"""Per-user daily quota counters: the database backend of ``usage.limiter.UsageLimiter``.

Redis is the primary store; these rows count a user's calls when no Redis is configured
(the embedded SQLite demo) or while Redis is unreachable (fallback)."""

from __future__ import annotations

from django.conf import settings
from django.db import models
from django.utils import timezone


class QuotaCounter(models.Model):
    """Calls one user made on one UTC day (only those counted by the database backend)."""

    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="quota_counters")
    day = models.DateField(help_text="UTC day the calls were counted on.")
    used = models.PositiveIntegerField(default=0)
    updated_at = models.DateTimeField(default=timezone.now)

    class Meta:
        db_table = "external_mcp_quota_counters"
        ordering = ["-day", "user_id"]
        constraints = [models.UniqueConstraint(fields=["user", "day"], name="quota_counter_user_day_unique")]
        # The unique index serves the hot lookups (user, day); this one serves retention purges by day.
        indexes = [models.Index(fields=["day"], name="quota_counter_day_idx")]

    def __str__(self) -> str:
        return f"user {self.user_id} on {self.day}: {self.used}"


class Outcome(models.TextChoices):
    OK = "ok", "OK"
    ERROR = "error", "Error"
    QUOTA = "quota", "Quota exceeded"
    BLOCKED = "blocked", "Blocked by governance"
    TIMEOUT = "timeout", "Upstream timeout"
    UPSTREAM_ERROR = "upstream_error", "Upstream error"
    CLIENT_DISCONNECT = "client_disconnect", "Client disconnected"


class UsageEvent(models.Model):
    """One proxied JSON-RPC message (or GET/DELETE). A log: foreign keys carry no database
    constraint, so inserts never fail or lock because a server or key was deleted meanwhile."""

    created_at = models.DateTimeField(default=timezone.now)
    user = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, on_delete=models.DO_NOTHING, db_constraint=False,
                             related_name="+")
    workspace = models.ForeignKey("twinmcp.Workspace", null=True, on_delete=models.DO_NOTHING, db_constraint=False,
                                  related_name="+")
    server = models.ForeignKey("external_mcp.ExternalMcpServer", null=True, on_delete=models.DO_NOTHING,
                               db_constraint=False, related_name="+")
    api_key = models.ForeignKey("twinmcp.ApiKey", null=True, on_delete=models.DO_NOTHING, db_constraint=False,
                                related_name="+")
    method = models.CharField(max_length=100)
    tool_name = models.CharField(max_length=200, blank=True, default="")
    jsonrpc_id = models.CharField(max_length=100, blank=True, default="")
    request_id = models.CharField(max_length=64)
    tokens_in = models.PositiveIntegerField(default=0)
    tokens_out = models.PositiveIntegerField(default=0)
    bytes_in = models.PositiveIntegerField(default=0)
    bytes_out = models.BigIntegerField(default=0)
    latency_ms = models.FloatField()
    upstream_status = models.PositiveSmallIntegerField(null=True, blank=True)
    jsonrpc_error_code = models.IntegerField(null=True, blank=True)
    outcome = models.CharField(max_length=20, choices=Outcome.choices)
    counted = models.BooleanField(default=False)

    class Meta:
        db_table = "external_mcp_usage_logs"
        indexes = [
            models.Index(fields=["created_at"], name="usage_event_created"),
            models.Index(fields=["workspace", "created_at"], name="usage_event_ws_created"),
            models.Index(fields=["user", "created_at"], name="usage_event_user_created"),
        ]

    def __str__(self) -> str:
        return f"{self.method} {self.outcome} at {self.created_at:%Y-%m-%d %H:%M:%S}"
