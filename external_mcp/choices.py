"""Status, auth and transport values with their labels, colours and sort order in one place."""

from __future__ import annotations

from django.db import models


class ServerStatus(models.TextChoices):
    NEW = "new", "New"
    HEALTHY = "healthy", "Healthy"
    WARNING = "warning", "Warning"
    DOWN = "down", "Down"
    DISABLED = "disabled", "Disabled"
    # Never stored: shown when the last check is too old to believe the recorded status (staleness.py).
    STALE = "stale", "Stale (no recent check)"


# Down sorts first: what is broken is what an admin must see; then what nobody checks any more.
STATUS_SORT_ORDER = {
    ServerStatus.DOWN: 0,
    ServerStatus.STALE: 1,
    ServerStatus.WARNING: 2,
    ServerStatus.NEW: 3,
    ServerStatus.HEALTHY: 4,
    ServerStatus.DISABLED: 5,
}

STATUS_COLOURS = {
    ServerStatus.DOWN: "down",
    ServerStatus.STALE: "warn",
    ServerStatus.WARNING: "warn",
    ServerStatus.NEW: "new",
    ServerStatus.HEALTHY: "ok",
    ServerStatus.DISABLED: "off",
}


class AuthType(models.TextChoices):
    NONE = "none", "None"
    API_KEY = "api_key", "API key header"
    BASIC = "basic", "Basic auth"
    BEARER = "bearer", "Bearer token"
    MTLS = "mtls", "Client certificate (mTLS)"
    OAUTH2 = "oauth2", "OAuth 2.0 (reserved)"
    OAUTH2_CLIENT_CREDENTIALS = "oauth2_client_credentials", "OAuth 2.0 client credentials"


SUPPORTED_AUTH_TYPES = [t for t in AuthType.values if t != AuthType.OAUTH2]
SUPPORTED_AUTH_TYPE_CHOICES = [(t, AuthType(t).label) for t in SUPPORTED_AUTH_TYPES]


class Transport(models.TextChoices):
    STREAMABLE_HTTP = "streamable_http", "Streamable HTTP"


class AuditAction(models.TextChoices):
    CREATE = "create", "Created"
    UPDATE = "update", "Updated"
    DELETE = "delete", "Deleted"
    ROTATE = "credentials.rotate", "Credentials rotated"
    REENCRYPT = "credentials.reencrypt", "Credentials re-encrypted"
    DECRYPT_FAILED = "credentials.decrypt_failed", "Credentials could not be decrypted"
    TOOLS_APPROVE = "tools.approve", "Tools approved"
    TOOLS_DISABLE = "tools.disable", "Tools disabled"
    TOOLSET_CREATE = "toolset.create", "Toolset created"
    TOOLSET_UPDATE = "toolset.update", "Toolset updated"
    TOOLSET_DELETE = "toolset.delete", "Toolset deleted"


class PrefixMode(models.TextChoices):
    """How a toolset names its tools: ``<prefix>__<tool>`` always, or the upstream names as they are
    (only while no two of its tools share one)."""

    ALWAYS = "always", "Always prefixed"
    NEVER = "never", "Never prefixed"


class ToolState(models.TextChoices):
    PENDING = "pending", "Pending approval"
    APPROVED = "approved", "Approved"
    CHANGED = "changed", "Changed (quarantined)"
    REFUSED = "refused", "Refused by TwinMCP"
    DISABLED = "disabled", "Disabled"
    REMOVED = "removed", "Removed"


class NotificationKind(models.TextChoices):
    WARNING = "server.warning", "Server warning"
    DOWN = "server.down", "Server down"
    RECOVERED = "server.recovered", "Server recovered"
    TOOL_CHANGED = "tool.changed", "Tool definition changed"
    TOOL_REFUSED = "tool.refused", "Tool refused by TwinMCP"
    ALERT = "alert.failure_ratio", "Many health checks failing"
