"""Status, auth and transport values with their labels, colours and sort order in one place."""

from __future__ import annotations

from django.db import models


class ServerStatus(models.TextChoices):
    NEW = "new", "New"
    HEALTHY = "healthy", "Healthy"
    WARNING = "warning", "Warning"
    DOWN = "down", "Down"
    # OAuth: nobody has connected an account TwinMCP may use, or the connection needs renewing.
    NEEDS_AUTH = "needs_auth", "Needs authorization"
    DISABLED = "disabled", "Disabled"
    # Never stored: shown when the last check is too old to believe the recorded status (staleness.py).
    STALE = "stale", "Stale (no recent check)"


# Down sorts first: what is broken is what an admin must see; then what nobody checks any more.
STATUS_SORT_ORDER = {
    ServerStatus.DOWN: 0,
    ServerStatus.NEEDS_AUTH: 1,
    ServerStatus.STALE: 2,
    ServerStatus.WARNING: 3,
    ServerStatus.NEW: 4,
    ServerStatus.HEALTHY: 5,
    ServerStatus.DISABLED: 6,
}

STATUS_COLOURS = {
    ServerStatus.DOWN: "down",
    ServerStatus.NEEDS_AUTH: "warn",
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
    OAUTH2 = "oauth2", "OAuth 2.1 (sign in at the server)"
    OAUTH2_CLIENT_CREDENTIALS = "oauth2_client_credentials", "OAuth 2.0 client credentials"


# An account is connected (OAuth) rather than a secret entered: the stored credentials, if any,
# only say which client TwinMCP is at the authorization server.
CONNECTED_AUTH_TYPES = frozenset({AuthType.OAUTH2})


class CredentialMode(models.TextChoices):
    """Whose secret the proxy sends: the server's one (entered by an admin) or the calling member's."""

    SHARED = "shared", "Shared by the workspace"
    PER_USER = "per_user", "Each member's own"


class ConnectionState(models.TextChoices):
    ACTIVE = "active", "Connected"
    NEEDS_REAUTH = "needs_reauth", "Needs re-authorization"


class Transport(models.TextChoices):
    """How TwinMCP talks to a server. ``auto`` follows the spec's backwards-compatibility rule: a
    POST to the URL first (Streamable HTTP), then, if that is refused with 400, 404 or 405, a GET
    expecting an event stream whose first event names the message endpoint (HTTP+SSE, 2024-11-05);
    what answered is stored on the server as ``transport_found``."""

    AUTO = "auto", "Automatic (Streamable HTTP, else HTTP+SSE)"
    STREAMABLE_HTTP = "streamable_http", "Streamable HTTP"
    SSE = "sse", "HTTP+SSE (protocol 2024-11-05)"


CONCRETE_TRANSPORTS = (Transport.STREAMABLE_HTTP, Transport.SSE)


class AuditAction(models.TextChoices):
    CREATE = "create", "Created"
    UPDATE = "update", "Updated"
    DELETE = "delete", "Deleted"
    ROTATE = "credentials.rotate", "Credentials rotated"
    REENCRYPT = "credentials.reencrypt", "Credentials re-encrypted"
    DECRYPT_FAILED = "credentials.decrypt_failed", "Credentials could not be decrypted"
    TOOLS_APPROVE = "tools.approve", "Tools approved"
    TOOLS_DISABLE = "tools.disable", "Tools disabled"
    TOOLS_ENABLE = "tools.enable", "Tools enabled"
    TOOLSET_CREATE = "toolset.create", "Toolset created"
    TOOLSET_UPDATE = "toolset.update", "Toolset updated"
    TOOLSET_DELETE = "toolset.delete", "Toolset deleted"
    CONNECT = "connection.connect", "Account connected"
    DISCONNECT = "connection.disconnect", "Account disconnected"
    REAUTH = "connection.needs_reauth", "Connection needs re-authorization"
    MEMBER_ADD = "member.add", "Member added"
    MEMBER_ROLE = "member.role", "Member role changed"
    MEMBER_REMOVE = "member.remove", "Member removed"
    ALERT_RULE_CREATE = "alert_rule.create", "Alert rule created"
    ALERT_RULE_UPDATE = "alert_rule.update", "Alert rule updated"
    ALERT_RULE_DELETE = "alert_rule.delete", "Alert rule deleted"


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
    REAUTH = "connection.needs_reauth", "Connection needs re-authorization"
    USAGE_ALERT = "usage.alert", "Usage alert"
