"""API shapes. Secrets are write-only: reads show ``has_credentials`` and non-secret metadata."""

from __future__ import annotations

from drf_spectacular.utils import extend_schema_field
from rest_framework import serializers

from external_mcp import staleness, tool_names, toolsets
from external_mcp.choices import AuthType, ConnectionState, CredentialMode, PrefixMode, ServerStatus, Transport
from external_mcp.exposed_names import PREFIX_MAX_CHARS
from external_mcp.models import (
    AuditEvent,
    Connection,
    ExternalMcpCredential,
    ExternalMcpServer,
    ExternalMcpTool,
    HealthCheck,
    StatusChange,
    Toolset,
)
from twinmcp.parsers import BoundedJSONField


class CredentialMetadataSerializer(serializers.ModelSerializer):
    class Meta:
        model = ExternalMcpCredential
        fields = ["fingerprint", "key_id", "created_at", "rotated_at", "expires_at", "cert_subject",
                  "cert_issuer", "cert_not_after"]
        read_only_fields = fields


class ServerSerializer(serializers.ModelSerializer):
    workspace = serializers.SlugRelatedField(slug_field="slug", read_only=True)
    created_by = serializers.SlugRelatedField(slug_field="username", read_only=True)
    status = serializers.SerializerMethodField(
        help_text="The status to believe: the last check's verdict (recorded_status), or 'stale' when that check "
                  "is too old (health checks have stopped).")
    recorded_status = serializers.ChoiceField(
        source="status", choices=ServerStatus.choices, read_only=True,
        help_text="The verdict of the last recorded check (or new / disabled).")
    stale = serializers.SerializerMethodField()
    stale_since = serializers.SerializerMethodField(
        help_text="When the recorded status stopped being believable; null while it is.")
    has_credentials = serializers.SerializerMethodField()
    credential = serializers.SerializerMethodField()

    class Meta:
        model = ExternalMcpServer
        fields = [
            "id", "workspace", "name", "prefix", "base_url", "transport", "transport_found", "auth_type",
            "credential_mode", "status", "recorded_status",
            "stale", "stale_since", "error_message", "enabled", "description", "tags", "last_checked_at", "last_ok_at",
            "last_latency_ms", "consecutive_failures", "check_interval_seconds", "next_check_at", "has_credentials",
            "credential", "created_by", "created_at", "updated_at",
        ]
        read_only_fields = fields

    @extend_schema_field(serializers.ChoiceField(choices=ServerStatus.choices))
    def get_status(self, server: ExternalMcpServer) -> str:
        return staleness.shown_status(server)

    def get_stale(self, server: ExternalMcpServer) -> bool:
        return staleness.is_stale(server)

    @extend_schema_field(serializers.DateTimeField(allow_null=True))
    def get_stale_since(self, server: ExternalMcpServer) -> str | None:
        if not staleness.is_stale(server):
            return None
        return serializers.DateTimeField().to_representation(staleness.stale_since(server))

    def get_has_credentials(self, server: ExternalMcpServer) -> bool:
        return server.has_credentials

    @extend_schema_field(CredentialMetadataSerializer(allow_null=True))
    def get_credential(self, server: ExternalMcpServer) -> dict | None:
        if not server.has_credentials:
            return None
        return CredentialMetadataSerializer(server.credential).data


CREDENTIALS_HELP = (
    "Secret payload by auth_type — api_key: {header, value}; basic: {username, password}; bearer: {token}; "
    "mtls: {client_cert_pem, client_key_pem, ca_bundle_pem?}; oauth2_client_credentials: {client_id, "
    "client_secret, token_url?, scope?}; oauth2: {client_id?, client_secret?, scopes?} (omit to let TwinMCP "
    "register itself); none: omit. With credential_mode per_user, omit them (each member enters their own), "
    "except oauth2's client. Write-only."
)
TRANSPORT_HELP = ("auto (default): Streamable HTTP, else HTTP+SSE when the URL refuses a POST with 400, 404 or "
                  "405; streamable_http; sse: the 2024-11-05 transport (the URL is the event stream's, e.g. "
                  ".../sse). transport_found says what the last successful check spoke.")
CREDENTIAL_MODE_HELP = ("shared: the server's credentials (or the workspace's OAuth account) serve every member; "
                        "per_user: each member connects their own account or enters their own secret, and calls "
                        "carry the caller's.")


class ServerWriteSerializer(serializers.Serializer):
    """Type checks only; the rules live in external_mcp.services."""

    workspace = serializers.SlugField(required=False, help_text="Workspace slug (defaults to the key's).")
    name = serializers.CharField(max_length=100)
    prefix = serializers.CharField(
        max_length=PREFIX_MAX_CHARS, required=False,
        help_text="Its tools' names where several servers meet are <prefix>__<tool>: lowercase letters and digits "
                  "in runs joined by single '-' or '_', unique in the workspace. Default: derived from the name.")
    base_url = serializers.CharField(max_length=2048, help_text="The server's MCP endpoint URL.")
    transport = serializers.ChoiceField(choices=Transport.choices, default=Transport.AUTO, help_text=TRANSPORT_HELP)
    auth_type = serializers.ChoiceField(choices=AuthType.choices,
                                        default=AuthType.NONE)
    credential_mode = serializers.ChoiceField(choices=CredentialMode.choices, default=CredentialMode.SHARED,
                                              help_text=CREDENTIAL_MODE_HELP)
    credentials = BoundedJSONField(required=False, allow_null=True, write_only=True, help_text=CREDENTIALS_HELP)
    credentials_expires_at = serializers.DateTimeField(required=False, allow_null=True)
    description = serializers.CharField(required=False, allow_blank=True, max_length=2000, default="")
    tags = serializers.ListField(child=serializers.CharField(max_length=40), required=False, max_length=20,
                                 default=list)
    enabled = serializers.BooleanField(required=False, default=True)
    check_interval_seconds = serializers.IntegerField(required=False, min_value=15, max_value=86400)


class ServerUpdateSerializer(ServerWriteSerializer):
    name = serializers.CharField(max_length=100, required=False)
    base_url = serializers.CharField(max_length=2048, required=False)
    transport = serializers.ChoiceField(choices=Transport.choices, required=False, help_text=TRANSPORT_HELP)
    auth_type = serializers.ChoiceField(choices=AuthType.choices,
                                        required=False)
    credential_mode = serializers.ChoiceField(choices=CredentialMode.choices, required=False,
                                              help_text=CREDENTIAL_MODE_HELP)
    description = serializers.CharField(required=False, allow_blank=True, max_length=2000)
    tags = serializers.ListField(child=serializers.CharField(max_length=40), required=False, max_length=20)
    enabled = serializers.BooleanField(required=False)
    check_interval_seconds = serializers.IntegerField(required=False, min_value=15, max_value=86400)


class CredentialsRotateSerializer(serializers.Serializer):
    auth_type = serializers.ChoiceField(choices=AuthType.choices,
                                        required=False)
    credentials = BoundedJSONField(write_only=True, help_text=CREDENTIALS_HELP)
    expires_at = serializers.DateTimeField(required=False, allow_null=True)


class ConnectionSerializer(serializers.ModelSerializer):
    """Who connected and what it allows; never a token or a secret."""

    user = serializers.SlugRelatedField(slug_field="username", read_only=True,
                                        help_text="The member whose connection it is; null: the workspace's.")
    connected_by = serializers.SlugRelatedField(slug_field="username", read_only=True)
    state = serializers.ChoiceField(choices=ConnectionState.choices, read_only=True)

    class Meta:
        model = Connection
        fields = ["id", "user", "state", "connected_by", "connected_at", "refreshed_at", "expires_at", "scope",
                  "subject", "last_error", "fingerprint"]
        read_only_fields = fields


class OwnConnectionSerializer(serializers.Serializer):
    credentials = BoundedJSONField(write_only=True, help_text="Your own secret, shaped as the server's auth_type "
                                   "requires (see credentials on the server).")


class AuthorizationUrlSerializer(serializers.Serializer):
    authorization_url = serializers.URLField(help_text="Send the browser there; the authorization server sends it "
                                             "back to <TWINMCP_PUBLIC_URL>/oauth/callback.")


class ServerFilterSerializer(serializers.Serializer):
    status = serializers.ChoiceField(choices=ServerStatus.choices, required=False)
    tag = serializers.CharField(required=False, max_length=40)
    search = serializers.CharField(required=False, max_length=100)


class AuditEventSerializer(serializers.ModelSerializer):
    actor = serializers.SlugRelatedField(slug_field="username", read_only=True)

    class Meta:
        model = AuditEvent
        fields = ["id", "server_name", "actor", "action", "changes", "at"]
        read_only_fields = fields


class ToolSerializer(serializers.ModelSerializer):
    """Give ``context={"exposed_names": catalog.exposed_names_of(server)}``."""

    name_conforms = serializers.SerializerMethodField(
        help_text="Whether the name follows the MCP rules (1-128 of A-Za-z0-9_.-); other names may be approved, "
                  "but some clients refuse or rename them.")
    exposed_name = serializers.SerializerMethodField(
        help_text="The tool's name where several servers meet: <server prefix>__<name>, or a short form ending in "
                  "a digest of the name when that would break the MCP rules or EXTERNAL_MCP_TOOL_NAME_MAX_CHARS. "
                  "Null for a tool that is refused or no longer listed.")

    class Meta:
        model = ExternalMcpTool
        fields = ["name", "name_conforms", "exposed_name", "title", "description", "input_schema", "output_schema",
                  "annotations", "state", "refusal_reason", "definition_hash", "approved_hash", "approved_definition",
                  "definition", "first_seen_at", "last_seen_at", "approved_at", "changed_at"]
        read_only_fields = fields

    def get_name_conforms(self, tool: ExternalMcpTool) -> bool:
        return tool_names.conforms(tool.name)

    @extend_schema_field(serializers.CharField(allow_null=True))
    def get_exposed_name(self, tool: ExternalMcpTool) -> str | None:
        return self.context["exposed_names"].get(tool.name)


class ToolApproveSerializer(serializers.Serializer):
    names = serializers.ListField(child=serializers.CharField(max_length=200), required=False, max_length=5000)
    all = serializers.BooleanField(required=False, default=False)

    def validate(self, attrs: dict) -> dict:
        if not attrs.get("all") and not attrs.get("names"):
            raise serializers.ValidationError({"names": ["Give tool names, or all=true."]})
        return attrs


class ToolNamesSerializer(serializers.Serializer):
    names = serializers.ListField(child=serializers.CharField(max_length=200), min_length=1, max_length=5000,
                                  help_text="The tools' names as the server gives them.")


class HealthCheckSerializer(serializers.ModelSerializer):
    class Meta:
        model = HealthCheck
        fields = ["checked_at", "ok", "slow", "error_class", "error_message", "latency_ms", "protocol_version",
                  "timings_ms", "tool_count"]
        read_only_fields = fields


class StatusChangeSerializer(serializers.ModelSerializer):
    class Meta:
        model = StatusChange
        fields = ["old", "new", "reason", "at"]
        read_only_fields = fields


class ChecksSerializer(serializers.Serializer):
    checks = HealthCheckSerializer(many=True)
    status_changes = StatusChangeSerializer(many=True)


class TestResultSerializer(serializers.Serializer):
    ok = serializers.BooleanField()
    error_class = serializers.CharField()
    error_message = serializers.CharField()
    hint = serializers.CharField()
    protocol_version = serializers.CharField()
    era = serializers.CharField()
    transport = serializers.CharField(help_text="The transport the handshake succeeded on: streamable_http or sse.")
    server_name = serializers.CharField()
    server_version = serializers.CharField()
    latency_ms = serializers.FloatField()
    timings_ms = serializers.DictField(child=serializers.FloatField())
    status = serializers.CharField()
    server = ServerSerializer()
    tools = ToolSerializer(many=True)


class ToolsetServerSerializer(serializers.Serializer):
    id = serializers.UUIDField()
    name = serializers.CharField()
    prefix = serializers.CharField()


class ToolRefSerializer(serializers.Serializer):
    """One tool of a server, by the server's id and the tool's name."""

    server = serializers.UUIDField(help_text="The id of one of the workspace's servers.")
    name = serializers.CharField(max_length=tool_names.STORED_CHARS, trim_whitespace=False,
                                 help_text="The tool's name at its server (as GET …/servers/<id>/tools/ lists it).")


class ServerRefSerializer(serializers.Serializer):
    id = serializers.UUIDField()
    name = serializers.CharField()


class CollisionSerializer(serializers.Serializer):
    name = serializers.CharField(help_text="A tool name two or more members share.")
    servers = ServerRefSerializer(many=True, help_text="The servers that have it.")


TOOLSET_SERVERS_HELP = "Ids of the workspace's servers whose approved tools it serves, now and later."
TOOLSET_TOOLS_HELP = "Single tools it serves (each only itself), by server id and tool name."
PREFIX_MODE_HELP = ("always: tools are named <prefix>__<tool>; never: the servers' own names, allowed only while no "
                    "two members have a tool of the same name.")


class ToolsetSerializer(serializers.ModelSerializer):
    """Give ``context={"request": …, "served": toolsets.served_many(…)}``."""

    workspace = serializers.SlugRelatedField(slug_field="slug", read_only=True)
    created_by = serializers.SlugRelatedField(slug_field="username", read_only=True)
    servers = serializers.SerializerMethodField(help_text="Member servers: every approved tool of each.")
    tools = serializers.SerializerMethodField(help_text="Member tools: only these.")
    endpoint = serializers.SerializerMethodField(help_text="The toolset's MCP endpoint (Streamable HTTP), for agents.")
    exposed_tools = serializers.SerializerMethodField(
        help_text="The names agents see in tools/list now: approved tools of enabled members.")
    collisions = serializers.SerializerMethodField(
        help_text="Tool names two members share; a toolset that is never prefixed serves these prefixed. Empty "
                  "when prefix_mode is always.")

    class Meta:
        model = Toolset
        fields = ["id", "workspace", "name", "description", "prefix_mode", "servers", "tools", "endpoint",
                  "exposed_tools", "collisions", "created_by", "created_at", "updated_at"]
        read_only_fields = fields

    @extend_schema_field(ToolsetServerSerializer(many=True))
    def get_servers(self, toolset: Toolset) -> list[dict]:
        servers = sorted(toolset.servers.all(), key=lambda s: (s.name.lower(), str(s.pk)))
        return [{"id": str(s.pk), "name": s.name, "prefix": s.prefix} for s in servers]

    @extend_schema_field(ToolRefSerializer(many=True))
    def get_tools(self, toolset: Toolset) -> list[dict]:
        refs = [{"server": str(t.server_id), "name": t.name} for t in toolset.tools.all()]
        return sorted(refs, key=lambda ref: (ref["server"], ref["name"]))

    def get_endpoint(self, toolset: Toolset) -> str:
        return self.context["request"].build_absolute_uri(toolsets.endpoint_path(toolset.pk))

    @extend_schema_field(serializers.ListField(child=serializers.CharField()))
    def get_exposed_tools(self, toolset: Toolset) -> list[str]:
        return self.context["served"][toolset.pk].exposed_tools

    @extend_schema_field(CollisionSerializer(many=True))
    def get_collisions(self, toolset: Toolset) -> list[dict]:
        return [{"name": c.name, "servers": [{"id": str(i), "name": n} for i, n in c.servers]}
                for c in self.context["served"][toolset.pk].collisions]


class ToolsetWriteSerializer(serializers.Serializer):
    """Type checks only; the rules live in external_mcp.toolsets."""

    workspace = serializers.SlugField(required=False, help_text="Workspace slug (defaults to the key's).")
    name = serializers.CharField(max_length=100, help_text="Unique in the workspace, whatever the case.")
    description = serializers.CharField(required=False, allow_blank=True, max_length=2000, default="")
    prefix_mode = serializers.ChoiceField(choices=PrefixMode.choices, default=PrefixMode.ALWAYS,
                                          help_text=PREFIX_MODE_HELP)
    servers = serializers.ListField(child=serializers.UUIDField(), required=False, max_length=1000, default=list,
                                    help_text=TOOLSET_SERVERS_HELP)
    tools = serializers.ListField(child=ToolRefSerializer(), required=False, max_length=5000, default=list,
                                  help_text=TOOLSET_TOOLS_HELP)


class ToolsetUpdateSerializer(ToolsetWriteSerializer):
    workspace = None  # a toolset stays in its workspace
    name = serializers.CharField(max_length=100, required=False)
    description = serializers.CharField(required=False, allow_blank=True, max_length=2000)
    prefix_mode = serializers.ChoiceField(choices=PrefixMode.choices, required=False, help_text=PREFIX_MODE_HELP)
    servers = serializers.ListField(child=serializers.UUIDField(), required=False, max_length=1000,
                                    help_text=TOOLSET_SERVERS_HELP + " Replaces the members.")
    tools = serializers.ListField(child=ToolRefSerializer(), required=False, max_length=5000,
                                  help_text=TOOLSET_TOOLS_HELP + " Replaces the members.")
