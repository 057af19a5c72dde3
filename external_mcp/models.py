"""The external MCP server registry: servers, their encrypted credentials, the audit trail."""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta
from typing import Any

from django.conf import settings
from django.db import models
from django.db.models import Case, ExpressionWrapper, F, Value, When
from django.db.models.functions import Coalesce, Lower
from django.utils import timezone

from external_mcp import staleness
from external_mcp.choices import (
    CONCRETE_TRANSPORTS,
    AuditAction,
    AuthType,
    ConnectionState,
    CredentialMode,
    NotificationKind,
    PrefixMode,
    ServerStatus,
    ToolState,
    Transport,
)
from external_mcp.exposed_names import PREFIX_MAX_CHARS
from external_mcp.tool_names import STORED_CHARS
from twinmcp.models import Membership, Role, Workspace

PREFIX_CONSTRAINT = "external_mcp_server_prefix_unique"


class _Milliseconds(models.Func):
    """An integer number of milliseconds as a duration (an interval on PostgreSQL; SQLite stores
    durations as microseconds), so it can be added to a timestamp on both."""

    output_field = models.DurationField()

    def as_postgresql(self, compiler: Any, connection: Any, **extra: Any) -> Any:
        return self.as_sql(compiler, connection, template="(%(expressions)s * INTERVAL '1 millisecond')", **extra)

    def as_sqlite(self, compiler: Any, connection: Any, **extra: Any) -> Any:
        return self.as_sql(compiler, connection, template="(%(expressions)s * 1000)", **extra)


class ServerQuerySet(models.QuerySet["ExternalMcpServer"]):
    def visible_to(self, user: object, workspace_ids: list | None = None) -> ServerQuerySet:
        """Servers of the caller's workspaces (only the key's workspace for API-key callers)."""
        mine = Membership.objects.filter(user=user).values("workspace_id")
        qs = self.filter(workspace_id__in=mine)
        if workspace_ids is not None:
            qs = qs.filter(workspace_id__in=workspace_ids)
        return qs

    def administered_by(self, user: object) -> ServerQuerySet:
        admin_of = Membership.objects.filter(user=user, role=Role.ADMIN).values("workspace_id")
        return self.filter(workspace_id__in=admin_of)

    def with_tag(self, tag: str) -> ServerQuerySet:
        return self.filter(tags_index__contains=f",{tag.strip().lower()},")

    def search(self, text: str) -> ServerQuerySet:
        return self.filter(models.Q(name__icontains=text) | models.Q(description__icontains=text))

    def with_shown_status(self, now: datetime) -> ServerQuerySet:
        """Annotate ``shown_status``: the recorded status, or ``stale`` (the SQL form of
        ``external_mcp.staleness.shown_status``)."""
        intervals, slack = staleness.grace_parts()
        grace_ms = F("check_interval_seconds") * (intervals * 1000) + int(slack / timedelta(milliseconds=1))
        deadline = ExpressionWrapper(Coalesce("last_checked_at", "created_at") + _Milliseconds(grace_ms),
                                     output_field=models.DateTimeField())
        stale = models.Q(enabled=True, stale_at__lt=now) & ~models.Q(status=ServerStatus.DISABLED)
        return self.annotate(stale_at=deadline).annotate(shown_status=Case(
            When(stale, then=Value(ServerStatus.STALE.value)), default=F("status"),
            output_field=models.CharField()))

    def shown_as(self, status: str, now: datetime) -> ServerQuerySet:
        return self.with_shown_status(now).filter(shown_status=status)


class ExternalMcpServer(models.Model):
    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    workspace = models.ForeignKey(Workspace, on_delete=models.CASCADE, related_name="servers")
    name = models.CharField(max_length=100)
    prefix = models.CharField(max_length=PREFIX_MAX_CHARS, help_text="Its tools' names where several servers "
                              "meet: <prefix>__<tool> (external_mcp.exposed_names).")
    base_url = models.URLField(max_length=2048)
    transport = models.CharField(max_length=32, choices=Transport.choices, default=Transport.AUTO)
    transport_found = models.CharField(
        max_length=32, blank=True, default="", choices=[(t.value, t.label) for t in CONCRETE_TRANSPORTS],
        help_text="The transport the last successful check spoke (with ``auto``: the one it found).")
    auth_type = models.CharField(max_length=32, choices=AuthType.choices, default=AuthType.NONE)
    credential_mode = models.CharField(max_length=16, choices=CredentialMode.choices, default=CredentialMode.SHARED)
    check_as = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+",
        help_text="Per-user credentials: the member whose connection health checks and discovery use.")
    status = models.CharField(max_length=16, choices=ServerStatus.choices, default=ServerStatus.NEW)
    error_message = models.TextField(blank=True, default="")
    enabled = models.BooleanField(default=True)
    description = models.TextField(blank=True, default="")
    tags = models.JSONField(default=list, blank=True)
    tags_index = models.CharField(max_length=1200, blank=True, default="", editable=False)
    # Health facts: stored hard facts, the status is derived from them.
    last_checked_at = models.DateTimeField(null=True, blank=True)
    last_ok_at = models.DateTimeField(null=True, blank=True)
    last_latency_ms = models.PositiveIntegerField(null=True, blank=True)
    consecutive_failures = models.PositiveIntegerField(default=0)
    check_interval_seconds = models.PositiveIntegerField(default=60)
    next_check_at = models.DateTimeField(default=timezone.now, db_index=True)
    protocol_version = models.CharField(max_length=20, blank=True, default="")
    server_info = models.JSONField(default=dict, blank=True)
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    created_at = models.DateTimeField(default=timezone.now)
    updated_at = models.DateTimeField(auto_now=True)

    objects = ServerQuerySet.as_manager()

    class Meta:
        db_table = "external_mcp_servers"
        ordering = ["name"]
        constraints = [
            models.UniqueConstraint("workspace", Lower("name"), name="external_mcp_server_name_unique"),
            models.UniqueConstraint("workspace", "prefix", name=PREFIX_CONSTRAINT),
        ]

    def __str__(self) -> str:
        return self.name

    @property
    def has_credentials(self) -> bool:
        return self.auth_type != AuthType.NONE and hasattr(self, "credential")

    @property
    def speaks_sse(self) -> bool:
        """HTTP+SSE, as chosen or as the last successful check found it."""
        return Transport.SSE in (self.transport, self.transport_found)

    @property
    def per_user(self) -> bool:
        return self.credential_mode == CredentialMode.PER_USER

    @property
    def connects(self) -> bool:
        """Whether the proxy sends a member's connection (an OAuth grant or their own secret) rather
        than the server's stored credential."""
        return self.per_user or self.auth_type == AuthType.OAUTH2


class ExternalMcpCredential(models.Model):
    """One per server. ``ciphertext`` is the only place the secret lives (AES-GCM, key ring)."""

    server = models.OneToOneField(ExternalMcpServer, on_delete=models.CASCADE, related_name="credential")
    ciphertext = models.TextField()
    key_id = models.CharField(max_length=16, db_index=True)
    fingerprint = models.CharField(max_length=64)
    created_at = models.DateTimeField(default=timezone.now)
    rotated_at = models.DateTimeField(null=True, blank=True)
    expires_at = models.DateTimeField(null=True, blank=True)
    cert_subject = models.CharField(max_length=500, blank=True, default="")
    cert_issuer = models.CharField(max_length=500, blank=True, default="")
    cert_not_after = models.DateTimeField(null=True, blank=True)

    class Meta:
        db_table = "external_mcp_credentials"

    def __str__(self) -> str:
        return f"credentials of {self.server_id} ({self.fingerprint})"


class ConnectionQuerySet(models.QuerySet["Connection"]):
    def used_by(self, server: ExternalMcpServer, user_id: int | None) -> ConnectionQuerySet:
        """The connection the proxy sends for ``user_id``'s calls: their own when the server is
        per-user, else the workspace's (user null)."""
        return self.filter(server=server, user_id=user_id if server.per_user else None)


class Connection(models.Model):
    """An account connected to a server: an OAuth grant (``oauth2``) or, with per-user credentials,
    a member's own secret. ``user`` is null for the one connection a shared server uses.

    ``ciphertext`` holds the tokens or the secret (AES-GCM, bound to ``context``); ``version``
    grows at every token change, so a gateway process that refreshes can tell whether another one
    already did (``external_mcp.oauth.grants``)."""

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    server = models.ForeignKey(ExternalMcpServer, on_delete=models.CASCADE, related_name="connections")
    user = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.CASCADE,
                             related_name="mcp_connections")
    ciphertext = models.TextField()
    key_id = models.CharField(max_length=16, db_index=True)
    fingerprint = models.CharField(max_length=64)
    state = models.CharField(max_length=16, choices=ConnectionState.choices, default=ConnectionState.ACTIVE)
    version = models.PositiveIntegerField(default=1)
    expires_at = models.DateTimeField(null=True, blank=True, help_text="When the access token ends (OAuth).")
    scope = models.CharField(max_length=1000, blank=True, default="")
    subject = models.CharField(max_length=200, blank=True, default="",
                               help_text="Who the authorization server says connected, when it says so.")
    connected_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL,
                                     related_name="+")
    connected_at = models.DateTimeField(default=timezone.now)
    refreshed_at = models.DateTimeField(null=True, blank=True)
    last_error = models.TextField(blank=True, default="")

    objects = ConnectionQuerySet.as_manager()

    class Meta:
        db_table = "external_mcp_connections"
        constraints = [
            models.UniqueConstraint(fields=["server", "user"], name="external_mcp_connection_unique"),
            models.UniqueConstraint(fields=["server"], condition=models.Q(user__isnull=True),
                                    name="external_mcp_connection_shared_unique"),
        ]

    def __str__(self) -> str:
        return f"connection of {self.user_id or 'the workspace'} to {self.server_id} ({self.state})"

    @property
    def context(self) -> str:
        return connection_context(self.server_id, self.user_id)


def connection_context(server_id: object, user_id: object) -> str:
    """What a connection's ciphertext is bound to: copied to another row, it does not decrypt."""
    return f"connection:{server_id}:{user_id or 'shared'}"


class OAuthClient(models.Model):
    """What TwinMCP learnt about an ``oauth2`` server's authorization server, and the client it
    registered there (RFC 7591) when no client id was entered: found again at every Connect."""

    server = models.OneToOneField(ExternalMcpServer, on_delete=models.CASCADE, related_name="oauth_client")
    issuer = models.URLField(max_length=2048)
    resource = models.URLField(max_length=2048)
    metadata = models.JSONField(default=dict, help_text="The authorization server's metadata (RFC 8414).")
    scope = models.CharField(max_length=1000, blank=True, default="")
    registration = models.TextField(blank=True, default="", help_text="The registered client, encrypted.")
    key_id = models.CharField(max_length=16, blank=True, default="", db_index=True)
    redirect_uri = models.URLField(max_length=2048, blank=True, default="")
    auth_method = models.CharField(max_length=32, blank=True, default="",
                                   help_text="How an entered client's secret is presented, once one worked.")
    discovered_at = models.DateTimeField(default=timezone.now)

    class Meta:
        db_table = "external_mcp_oauth_clients"

    def __str__(self) -> str:
        return f"OAuth client of {self.server_id} at {self.issuer}"

    @property
    def context(self) -> str:
        return f"oauth-client:{self.server_id}"


class OAuthPending(models.Model):
    """An authorization under way: the ``state`` sent to the authorization server (only its hash
    is kept), who started it, and the PKCE verifier. Used once, by that user, within minutes."""

    state_hash = models.CharField(max_length=64, unique=True)
    server = models.ForeignKey(ExternalMcpServer, on_delete=models.CASCADE, related_name="+")
    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="+")
    own = models.BooleanField(help_text="The user's own connection (per-user), not the workspace's.")
    verifier = models.TextField(help_text="The PKCE code verifier, encrypted.")
    key_id = models.CharField(max_length=16, blank=True, default="", db_index=True)
    expires_at = models.DateTimeField(db_index=True)

    class Meta:
        db_table = "external_mcp_oauth_pending"

    def __str__(self) -> str:
        return f"authorization of {self.server_id} by {self.user_id}"

    @property
    def context(self) -> str:
        return f"oauth-pending:{self.state_hash}"


class OAuthRevocation(models.Model):
    """Tokens to revoke at an authorization server (RFC 7009), written in the transaction that
    dropped them (disconnect, delete, a new connection) and sent by a task with retries, so
    neither the admin's click waits on the authorization server nor a failed call loses them."""

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    ciphertext = models.TextField(help_text="The tokens, the endpoint and the client, encrypted.")
    key_id = models.CharField(max_length=16, db_index=True)
    attempts = models.PositiveSmallIntegerField(default=0)
    next_attempt_at = models.DateTimeField(default=timezone.now, db_index=True)
    last_error = models.TextField(blank=True, default="")
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        db_table = "external_mcp_oauth_revocations"

    def __str__(self) -> str:
        return f"revocation {self.pk} ({self.attempts} attempts)"

    @property
    def context(self) -> str:
        return f"oauth-revocation:{self.pk}"


class AuditEvent(models.Model):
    """Who did what to which server. ``changes`` holds field names and non-secret values only."""

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    workspace = models.ForeignKey(Workspace, on_delete=models.CASCADE, related_name="audit_events")
    server = models.ForeignKey(
        ExternalMcpServer, null=True, blank=True, on_delete=models.SET_NULL, related_name="audit_events"
    )
    server_name = models.CharField(max_length=100, blank=True, default="")
    actor = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    action = models.CharField(max_length=40, choices=AuditAction.choices)
    changes = models.JSONField(default=dict, blank=True)
    at = models.DateTimeField(default=timezone.now, db_index=True)

    class Meta:
        ordering = ["-at"]

    def __str__(self) -> str:
        return f"{self.action} {self.server_name} by {self.actor_id} at {self.at:%Y-%m-%d %H:%M}"


class HealthCheck(models.Model):
    """One check's outcome: the hard facts the status is derived from."""

    server = models.ForeignKey(ExternalMcpServer, on_delete=models.CASCADE, related_name="checks")
    checked_at = models.DateTimeField(default=timezone.now)
    ok = models.BooleanField()
    slow = models.BooleanField(default=False)
    error_class = models.CharField(max_length=16, blank=True, default="")
    error_message = models.TextField(blank=True, default="")
    latency_ms = models.PositiveIntegerField(null=True, blank=True)
    protocol_version = models.CharField(max_length=20, blank=True, default="")
    timings_ms = models.JSONField(default=dict, blank=True)
    tool_count = models.PositiveIntegerField(null=True, blank=True)

    class Meta:
        ordering = ["-checked_at"]
        indexes = [models.Index(fields=["server", "-checked_at"]), models.Index(fields=["checked_at"])]

    def __str__(self) -> str:
        return f"{self.server_id} {'ok' if self.ok else self.error_class} at {self.checked_at:%H:%M:%S}"


class StatusChange(models.Model):
    server = models.ForeignKey(ExternalMcpServer, on_delete=models.CASCADE, related_name="status_changes")
    old = models.CharField(max_length=16, choices=ServerStatus.choices)
    new = models.CharField(max_length=16, choices=ServerStatus.choices)
    reason = models.TextField(blank=True, default="")
    at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["-at"]
        indexes = [models.Index(fields=["server", "-at"])]

    def __str__(self) -> str:
        return f"{self.server_id}: {self.old} -> {self.new}"


class ToolQuerySet(models.QuerySet["ExternalMcpTool"]):
    def callable(self) -> ToolQuerySet:
        return self.filter(state=ToolState.APPROVED)

    def listed(self) -> ToolQuerySet:
        """The tools the server lists now, with names TwinMCP accepts (approved or not)."""
        return self.exclude(state__in=(ToolState.REMOVED, ToolState.REFUSED))


class ExternalMcpTool(models.Model):
    """A tool as the upstream defines it, pinned by hash: only approved definitions are callable.

    ``name`` is the name as received when TwinMCP accepts it, else a storage key that no accepted
    name can equal (``tool_names``); ``refusal_reason`` says why a tool cannot be approved."""

    server = models.ForeignKey(ExternalMcpServer, on_delete=models.CASCADE, related_name="tools")
    name = models.CharField(max_length=STORED_CHARS)
    title = models.CharField(max_length=300, blank=True, default="")
    description = models.TextField(blank=True, default="")
    input_schema = models.JSONField(default=dict, blank=True)
    output_schema = models.JSONField(null=True, blank=True)
    annotations = models.JSONField(null=True, blank=True)
    definition = models.JSONField(default=dict)
    definition_hash = models.CharField(max_length=64)
    state = models.CharField(max_length=16, choices=ToolState.choices, default=ToolState.PENDING)
    refusal_reason = models.TextField(blank=True, default="")
    approved_definition = models.JSONField(null=True, blank=True)
    approved_hash = models.CharField(max_length=64, blank=True, default="")
    approved_at = models.DateTimeField(null=True, blank=True)
    approved_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    first_seen_at = models.DateTimeField(default=timezone.now)
    last_seen_at = models.DateTimeField(default=timezone.now)
    changed_at = models.DateTimeField(null=True, blank=True)

    objects = ToolQuerySet.as_manager()

    class Meta:
        ordering = ["name"]
        constraints = [models.UniqueConstraint(fields=["server", "name"], name="external_mcp_tool_unique")]

    def __str__(self) -> str:
        return f"{self.name} ({self.state})"


class ToolsetQuerySet(models.QuerySet["Toolset"]):
    def visible_to(self, user: object) -> ToolsetQuerySet:
        return self.filter(workspace__memberships__user=user).distinct()


class Toolset(models.Model):
    """A named subset of a workspace's servers and tools with its own MCP endpoint. A member server
    brings every tool it has approved, now and later; a member tool only itself."""

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    workspace = models.ForeignKey(Workspace, on_delete=models.CASCADE, related_name="toolsets")
    name = models.CharField(max_length=100)
    description = models.TextField(blank=True, default="")
    prefix_mode = models.CharField(max_length=8, choices=PrefixMode.choices, default=PrefixMode.ALWAYS)
    servers = models.ManyToManyField(ExternalMcpServer, blank=True, related_name="toolsets")
    tools = models.ManyToManyField(ExternalMcpTool, blank=True, related_name="toolsets")
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    created_at = models.DateTimeField(default=timezone.now)
    updated_at = models.DateTimeField(auto_now=True)

    objects = ToolsetQuerySet.as_manager()

    class Meta:
        db_table = "external_mcp_toolsets"
        ordering = ["name"]
        constraints = [models.UniqueConstraint("workspace", Lower("name"), name="external_mcp_toolset_name_unique")]

    def __str__(self) -> str:
        return self.name


class NotificationQuerySet(models.QuerySet["Notification"]):
    def email_due(self, now: datetime) -> NotificationQuerySet:
        """E-mails to send now: never sent, and due (new, backoff over, or a dead worker's lease over)."""
        return self.filter(email_sent_at__isnull=True, email_next_attempt_at__lte=now)


class Notification(models.Model):
    """An in-app notification for one admin; ``dedup_key`` makes each transition notify once.

    Its e-mail is delivered at least once and recorded as sent at most once: ``email_next_attempt_at``
    is when it is due (null: nothing more to try), ``email_attempts`` counts claims, and a claim
    pushes ``email_next_attempt_at`` past a lease, so the e-mail of a worker that died is due again
    when the lease ends (``external_mcp.notifications``)."""

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="notifications")
    workspace = models.ForeignKey(Workspace, on_delete=models.CASCADE, related_name="notifications")
    server = models.ForeignKey(
        ExternalMcpServer, null=True, blank=True, on_delete=models.CASCADE, related_name="notifications"
    )
    kind = models.CharField(max_length=32, choices=NotificationKind.choices)
    title = models.CharField(max_length=200)
    body = models.TextField(blank=True, default="")
    dedup_key = models.CharField(max_length=200)
    created_at = models.DateTimeField(default=timezone.now)
    read_at = models.DateTimeField(null=True, blank=True)
    email_sent_at = models.DateTimeField(null=True, blank=True)
    email_attempts = models.PositiveSmallIntegerField(default=0)
    email_next_attempt_at = models.DateTimeField(null=True, blank=True, db_index=True)
    email_last_attempt_at = models.DateTimeField(null=True, blank=True)
    email_last_error = models.TextField(blank=True, default="")

    objects = NotificationQuerySet.as_manager()

    class Meta:
        ordering = ["-created_at"]
        constraints = [models.UniqueConstraint(fields=["user", "dedup_key"], name="notification_dedup")]
        indexes = [models.Index(fields=["user", "read_at"])]

    def __str__(self) -> str:
        return self.title
