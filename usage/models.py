"""Usage events, their daily aggregates and billing records, and the quota's own bookkeeping."""

from __future__ import annotations

import uuid
from datetime import UTC, date, datetime, timedelta
from datetime import time as dt_time

from django.conf import settings
from django.db import models
from django.utils import timezone


class QuotaCounter(models.Model):
    """Calls one user made on one UTC day, when no Redis is configured (the embedded SQLite
    demo): then this row is the quota's only store, kept strict by a conditional UPDATE."""

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


class QuotaEpoch(models.Model):
    """One life of the Redis quota counters. A Redis that comes back without them (restarted
    without persistence, flushed) starts a new epoch; a row here is how the limiter tells that
    from the very first start, when no call can be in flight. Rows are never purged: they are
    the history of quota resets operators read in the runbook."""

    started_at = models.DateTimeField(default=timezone.now)
    refuse_capped_until = models.DateTimeField(
        help_text="Capped plans get 503 until this instant: calls admitted before the reset settle first.")

    class Meta:
        db_table = "external_mcp_quota_epochs"
        ordering = ["-started_at"]

    def __str__(self) -> str:
        return f"quota epoch from {self.started_at:%Y-%m-%d %H:%M:%S}"


class Outcome(models.TextChoices):
    OK = "ok", "OK"
    ERROR = "error", "Error"
    QUOTA = "quota", "Quota exceeded"
    BLOCKED = "blocked", "Blocked by governance"
    TIMEOUT = "timeout", "Upstream timeout"
    UPSTREAM_ERROR = "upstream_error", "Upstream error"
    CLIENT_DISCONNECT = "client_disconnect", "Client disconnected"


class Endpoint(models.TextChoices):
    """Which gateway endpoint a request came through."""

    SERVER = "server", "Server endpoint"
    WORKSPACE = "workspace", "Workspace endpoint"
    TOOLSET = "toolset", "Toolset endpoint"


class UsageEventQuerySet(models.QuerySet["UsageEvent"]):
    def counted_for(self, *, user_id: int, day: date) -> UsageEventQuerySet:
        """The uses charged to a user on a UTC day: the quota's durable truth."""
        start = datetime.combine(day, dt_time.min, tzinfo=UTC)
        return self.filter(user_id=user_id, counted=True, created_at__gte=start,
                           created_at__lt=start + timedelta(days=1))


class UsageEvent(models.Model):
    """One proxied JSON-RPC message (or GET/DELETE). A log: foreign keys carry no database
    constraint, so inserts never fail or lock because a server or key was deleted meanwhile, and
    no single-column index either: every read is a time range, served by the composite indexes,
    and each index is one more write on the proxy's hot path."""

    created_at = models.DateTimeField(default=timezone.now)
    user = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, on_delete=models.DO_NOTHING, db_constraint=False,
                             db_index=False, related_name="+")
    workspace = models.ForeignKey("twinmcp.Workspace", null=True, on_delete=models.DO_NOTHING, db_constraint=False,
                                  db_index=False, related_name="+")
    server = models.ForeignKey("external_mcp.ExternalMcpServer", null=True, on_delete=models.DO_NOTHING,
                               db_constraint=False, db_index=False, related_name="+")
    api_key = models.ForeignKey("twinmcp.ApiKey", null=True, on_delete=models.DO_NOTHING, db_constraint=False,
                                db_index=False, related_name="+")
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
    endpoint = models.CharField(max_length=16, choices=Endpoint.choices, default=Endpoint.SERVER)
    toolset = models.ForeignKey("external_mcp.Toolset", null=True, blank=True, on_delete=models.DO_NOTHING,
                                db_constraint=False, db_index=False, related_name="+")

    objects = UsageEventQuerySet.as_manager()

    class Meta:
        db_table = "external_mcp_usage_logs"
        indexes = [
            models.Index(fields=["created_at"], name="usage_event_created"),
            models.Index(fields=["workspace", "created_at"], name="usage_event_ws_created"),
            models.Index(fields=["user", "created_at"], name="usage_event_user_created"),
        ]

    def __str__(self) -> str:
        return f"{self.method} {self.outcome} at {self.created_at:%Y-%m-%d %H:%M:%S}"


# -- daily aggregates ---------------------------------------------------------------------------

# Outcomes that count as errors in the aggregates and the usage API.
ERROR_OUTCOMES = (Outcome.ERROR, Outcome.TIMEOUT, Outcome.UPSTREAM_ERROR)


class UsageDaily(models.Model):
    """One (UTC day, workspace, user, server, tool) bucket of usage events, written only by
    ``usage.aggregation``. ``tool`` is "" for methods other than ``tools/call``. Like
    ``UsageEvent``, the foreign keys carry no database constraint: deleting a server or a user
    never breaks (or deletes) history. ``latency_p95_ms`` is PostgreSQL's
    ``percentile_cont(0.95)`` (linear interpolation) over the bucket's latencies."""

    day = models.DateField(help_text="UTC day of the events.")
    workspace = models.ForeignKey("twinmcp.Workspace", null=True, on_delete=models.DO_NOTHING, db_constraint=False,
                                  related_name="+")
    user = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, on_delete=models.DO_NOTHING, db_constraint=False,
                             related_name="+")
    server = models.ForeignKey("external_mcp.ExternalMcpServer", null=True, on_delete=models.DO_NOTHING,
                               db_constraint=False, related_name="+")
    tool = models.CharField(max_length=200, blank=True, default="")
    requests = models.BigIntegerField(default=0)
    counted = models.BigIntegerField(default=0, help_text="Uses counted against the daily quota.")
    errors = models.BigIntegerField(default=0, help_text="Outcomes error, timeout and upstream_error.")
    quota_rejections = models.BigIntegerField(default=0)
    blocked = models.BigIntegerField(default=0)
    timeouts = models.BigIntegerField(default=0, db_default=0, help_text="Outcome timeout (also in errors).")
    upstream_errors = models.BigIntegerField(default=0, db_default=0,
                                             help_text="Outcome upstream_error (also in errors).")
    client_disconnects = models.BigIntegerField(default=0, db_default=0)
    tokens_in = models.BigIntegerField(default=0)
    tokens_out = models.BigIntegerField(default=0)
    bytes_in = models.BigIntegerField(default=0)
    bytes_out = models.BigIntegerField(default=0)
    latency_sum_ms = models.FloatField(default=0)
    latency_avg_ms = models.FloatField(default=0)
    latency_p95_ms = models.FloatField(null=True, blank=True)
    first_at = models.DateTimeField()
    last_at = models.DateTimeField()

    class Meta:
        db_table = "external_mcp_usage_daily"
        ordering = ["day", "workspace_id", "user_id", "server_id", "tool"]
        constraints = [
            models.UniqueConstraint(fields=["day", "workspace", "user", "server", "tool"],
                                    name="usage_daily_bucket_unique"),
        ]
        indexes = [
            models.Index(fields=["workspace", "day"], name="usage_daily_ws_day"),
            models.Index(fields=["user", "day"], name="usage_daily_user_day"),
        ]

    def __str__(self) -> str:
        return f"{self.day} ws={self.workspace_id} user={self.user_id} server={self.server_id} {self.tool!r}"


class DayState(models.TextChoices):
    PARTIAL = "partial", "Partial (the day is not over, or not finalised yet)"
    FINAL = "final", "Final"


class UsageDayStateQuerySet(models.QuerySet["UsageDayState"]):
    def settled(self) -> UsageDayStateQuerySet:
        """Days whose aggregates will not change: final, or whose raw events were purged."""
        return self.filter(models.Q(state=DayState.FINAL) | models.Q(raw_purged_at__isnull=False))


class UsageDayState(models.Model):
    """The fill-state mark of one UTC day's aggregates (Zulip ``analytics`` style). A day is
    rewritten in one transaction (delete its buckets, insert them again), so a crashed run
    leaves the previous state and is simply redone. A partial day's buckets cover the events
    created before ``covered_until``; the usage API adds the raw events since. ``raw_purged_at``
    is set by retention before it deletes the day's raw events: from then on the aggregates are
    the only record and the day is never recomputed."""

    day = models.DateField(primary_key=True)
    state = models.CharField(max_length=16, choices=DayState.choices, default=DayState.PARTIAL)
    filled_at = models.DateTimeField(null=True, blank=True)
    covered_until = models.DateTimeField(
        null=True, blank=True,
        help_text="The buckets hold the events created before this instant: the next midnight once final; "
                  "for a partial day, the last fill minus USAGE_FINALIZE_GRACE_SECONDS.")
    events = models.BigIntegerField(default=0, help_text="Raw events aggregated on the last fill.")
    buckets = models.PositiveIntegerField(default=0, help_text="UsageDaily rows written on the last fill.")
    raw_purged_at = models.DateTimeField(null=True, blank=True)

    objects = UsageDayStateQuerySet.as_manager()

    class Meta:
        db_table = "external_mcp_usage_day_state"
        ordering = ["day"]

    def __str__(self) -> str:
        return f"{self.day}: {self.state}"

    @property
    def settled(self) -> bool:
        return self.state == DayState.FINAL or self.raw_purged_at is not None


class BillingRecord(models.Model):
    """Per (UTC day, workspace, user) billable figures, written by the default billing hook
    (``usage.billing.BillingRecordHook``) when a day is finalised; rewritten idempotently."""

    day = models.DateField()
    workspace = models.ForeignKey("twinmcp.Workspace", null=True, on_delete=models.DO_NOTHING, db_constraint=False,
                                  related_name="+")
    user = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, on_delete=models.DO_NOTHING, db_constraint=False,
                             related_name="+")
    requests = models.BigIntegerField(default=0)
    counted = models.BigIntegerField(default=0)
    tokens_in = models.BigIntegerField(default=0)
    tokens_out = models.BigIntegerField(default=0)
    computed_at = models.DateTimeField(default=timezone.now)

    class Meta:
        db_table = "external_mcp_billing_records"
        ordering = ["day", "workspace_id", "user_id"]
        constraints = [
            models.UniqueConstraint(fields=["day", "workspace", "user"], name="billing_record_day_ws_user_unique"),
        ]
        indexes = [models.Index(fields=["workspace", "day"], name="billing_record_ws_day")]

    def __str__(self) -> str:
        return f"{self.day} ws={self.workspace_id} user={self.user_id}: {self.counted} uses"


# -- usage alerts ---------------------------------------------------------------------------------


class AlertKind(models.TextChoices):
    MEMBER_DAILY_CALLS = "member_daily_calls", "Member tool calls in a UTC day"
    SERVER_ERROR_RATE = "server_error_rate", "Server error rate over the last hour"
    QUOTA_REJECTION = "quota_rejection", "Quota rejection"


class AlertRuleQuerySet(models.QuerySet["AlertRule"]):
    def with_last_breach(self) -> AlertRuleQuerySet:
        return self.annotate(last_breach_at=models.Max("breaches__detected_at"))


class AlertRule(models.Model):
    """A condition on a workspace's raw usage events that notifies its admins, written only by
    ``usage.alerts``. No member (or no server) means any member (or every server) of the workspace.
    ``threshold`` is a number of tool calls, or a percentage for the error rate; quota rejections
    fire on the first one."""

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    workspace = models.ForeignKey("twinmcp.Workspace", on_delete=models.CASCADE, related_name="alert_rules")
    kind = models.CharField(max_length=32, choices=AlertKind.choices)
    member = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.CASCADE,
                               related_name="+")
    server = models.ForeignKey("external_mcp.ExternalMcpServer", null=True, blank=True, on_delete=models.CASCADE,
                               related_name="+")
    threshold = models.PositiveIntegerField(default=0)
    min_calls = models.PositiveIntegerField(
        default=20, help_text="Error rate only: fewer requests in the hour never fire.")
    enabled = models.BooleanField(default=True)
    created_at = models.DateTimeField(default=timezone.now)
    updated_at = models.DateTimeField(default=timezone.now)

    objects = AlertRuleQuerySet.as_manager()

    class Meta:
        db_table = "usage_alert_rules"
        ordering = ["created_at", "id"]
        indexes = [models.Index(fields=["kind", "enabled"], name="usage_alert_rule_kind")]

    def __str__(self) -> str:
        return f"{self.kind} in workspace {self.workspace_id}"


class AlertBreach(models.Model):
    """One breach of a rule: by whom (``subject``: a member or a server) in which window (the
    UTC day, or the UTC hour it was detected in). The unique key is what makes a breach notify once,
    whichever worker sees it first."""

    rule = models.ForeignKey(AlertRule, on_delete=models.CASCADE, related_name="breaches")
    subject = models.CharField(max_length=64)
    window_start = models.DateTimeField()
    value = models.FloatField(help_text="The figure that crossed the threshold when first detected.")
    detected_at = models.DateTimeField(default=timezone.now)

    class Meta:
        db_table = "usage_alert_breaches"
        ordering = ["-detected_at"]
        constraints = [
            models.UniqueConstraint(fields=["rule", "subject", "window_start"], name="usage_alert_breach_unique"),
        ]

    def __str__(self) -> str:
        return f"rule {self.rule_id} {self.subject} at {self.window_start:%Y-%m-%d %H:%M}"


# -- usage export pipelines -------------------------------------------------------------------------


class DestinationKind(models.TextChoices):
    FILES = "files", "Files: Parquet and JSON Lines per day (BigQuery, object storage)"
    CLICKHOUSE = "clickhouse", "ClickHouse over HTTP"


class ExportLevel(models.TextChoices):
    DAILY = "daily", "Daily aggregates (one row per workspace, user, server and tool)"
    EVENTS = "events", "Events (one row per proxied request)"


class DeliveryState(models.TextChoices):
    RUNNING = "running", "Running"
    DELIVERED = "delivered", "Delivered"
    FAILED = "failed", "Failed (retried with backoff)"
    UNAVAILABLE = "unavailable", "Unavailable (the raw events were purged before delivery)"


def _yesterday() -> date:
    return timezone.now().date() - timedelta(days=1)


class ExportDestinationQuerySet(models.QuerySet["ExportDestination"]):
    def enabled(self) -> ExportDestinationQuerySet:
        return self.filter(enabled=True)


class ExportDestination(models.Model):
    """Where finalised usage days go by themselves (``usage.delivery``): a directory of daily
    partitions, or a ClickHouse table. Written only by ``usage.destinations``; the ClickHouse
    password is encrypted with the key ring (context: the destination id) and never shown."""

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    name = models.SlugField(max_length=64, unique=True, help_text="Names the destination in metrics and commands.")
    kind = models.CharField(max_length=16, choices=DestinationKind.choices)
    level = models.CharField(max_length=16, choices=ExportLevel.choices, default=ExportLevel.DAILY)
    pseudonymize = models.BooleanField(
        default=True, help_text="Replace user ids with per-workspace keyed pseudonyms; drop usernames, e-mails and "
                                "API key ids.")
    enabled = models.BooleanField(default=True)
    start_day = models.DateField(default=_yesterday, help_text="The first UTC day to deliver.")
    directory = models.CharField(max_length=1024, blank=True, default="",
                                 help_text="Files: the directory the partitions are written under.")
    url = models.CharField(max_length=512, blank=True, default="",
                           help_text="ClickHouse: the HTTP interface, e.g. http://127.0.0.1:8123.")
    database = models.CharField(max_length=64, blank=True, default="twinmcp")
    table = models.CharField(max_length=64, blank=True, default="",
                             help_text="ClickHouse table; usage_daily or usage_events by level when empty.")
    username = models.CharField(max_length=128, blank=True, default="")
    password_ciphertext = models.TextField(blank=True, default="", editable=False)
    key_id = models.CharField(max_length=16, blank=True, default="", db_index=True, editable=False)
    created_at = models.DateTimeField(default=timezone.now, editable=False)
    updated_at = models.DateTimeField(default=timezone.now, editable=False)

    objects = ExportDestinationQuerySet.as_manager()

    class Meta:
        db_table = "usage_export_destinations"
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name

    @property
    def context(self) -> str:
        return f"usage-export-destination:{self.pk}"


class ExportDeliveryQuerySet(models.QuerySet["ExportDelivery"]):
    def done(self) -> ExportDeliveryQuerySet:
        return self.filter(state__in=[DeliveryState.DELIVERED, DeliveryState.UNAVAILABLE])


class ExportDelivery(models.Model):
    """What one destination received of one UTC day: the rows and checksum of the last delivery,
    its attempts and last error. ``source_filled_at`` is the day's ``UsageDayState.filled_at``
    when it was delivered: a day re-aggregated since is delivered again, replacing it."""

    destination = models.ForeignKey(ExportDestination, on_delete=models.CASCADE, related_name="deliveries")
    day = models.DateField()
    state = models.CharField(max_length=16, choices=DeliveryState.choices, default=DeliveryState.RUNNING)
    rows = models.BigIntegerField(null=True, blank=True)
    checksum = models.CharField(max_length=64, blank=True, default="",
                                help_text="SHA-256 of the day's rows as the JSON Lines delivered.")
    attempts = models.PositiveIntegerField(default=0)
    failures = models.PositiveIntegerField(default=0, help_text="Failed attempts, ever (for the metrics).")
    last_error = models.TextField(blank=True, default="")
    started_at = models.DateTimeField(null=True, blank=True)
    lease_until = models.DateTimeField(null=True, blank=True,
                                       help_text="A running delivery not renewed by then is taken as dead.")
    delivered_at = models.DateTimeField(null=True, blank=True)
    next_attempt_at = models.DateTimeField(null=True, blank=True)
    source_filled_at = models.DateTimeField(null=True, blank=True)

    objects = ExportDeliveryQuerySet.as_manager()

    class Meta:
        db_table = "usage_export_deliveries"
        verbose_name_plural = "export deliveries"
        ordering = ["destination_id", "-day"]
        constraints = [
            models.UniqueConstraint(fields=["destination", "day"], name="usage_export_delivery_unique"),
        ]

    def __str__(self) -> str:
        return f"{self.destination_id} {self.day}: {self.state}"
