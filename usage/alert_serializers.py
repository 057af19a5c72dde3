"""Shapes of the usage alert rules API: type checks only, the rules live in ``usage.alerts``."""

from __future__ import annotations

from typing import Any

from rest_framework import serializers

from usage import alerts
from usage.models import AlertKind, AlertRule

MEMBER_HELP = "Username (or user id) of a member of the workspace; null: any member. Not for error-rate rules."
SERVER_HELP = "Id of one of the workspace's servers; null: each server. Error-rate rules only."
THRESHOLD_HELP = ("member_daily_calls: tool calls in a UTC day, more fires (1 or more); server_error_rate: the "
                  "error rate in % over the last hour (1 to 100); quota_rejection: not used, the first one fires.")


class AlertRuleSerializer(serializers.Serializer):
    id = serializers.UUIDField(read_only=True)
    workspace = serializers.CharField(source="workspace.slug", read_only=True)
    kind = serializers.ChoiceField(choices=AlertKind.choices, read_only=True)
    description = serializers.SerializerMethodField()
    member = serializers.SerializerMethodField(help_text="Username, or null for any member.")
    server = serializers.UUIDField(source="server_id", read_only=True, allow_null=True)
    server_name = serializers.SerializerMethodField()
    threshold = serializers.IntegerField(read_only=True)
    min_calls = serializers.IntegerField(read_only=True)
    enabled = serializers.BooleanField(read_only=True)
    last_breach_at = serializers.DateTimeField(read_only=True, allow_null=True)
    created_at = serializers.DateTimeField(read_only=True)
    updated_at = serializers.DateTimeField(read_only=True)

    def get_description(self, rule: AlertRule) -> str:
        return alerts.describe(rule)

    def get_member(self, rule: AlertRule) -> str | None:
        return rule.member.get_username() if rule.member else None

    def get_server_name(self, rule: AlertRule) -> str | None:
        return rule.server.name if rule.server else None


class AlertRuleWriteSerializer(serializers.Serializer):
    workspace = serializers.SlugField(required=False, help_text="Workspace slug (defaults to the key's).")
    kind = serializers.ChoiceField(choices=AlertKind.choices)
    member = serializers.CharField(required=False, allow_null=True, allow_blank=True, max_length=150,
                                   help_text=MEMBER_HELP)
    server = serializers.UUIDField(required=False, allow_null=True, help_text=SERVER_HELP)
    threshold = serializers.IntegerField(required=False, min_value=0, max_value=alerts.MAX_CALLS_THRESHOLD,
                                         help_text=THRESHOLD_HELP)
    min_calls = serializers.IntegerField(required=False, min_value=1, max_value=alerts.MAX_MIN_CALLS,
                                         help_text="server_error_rate: fewer requests in the hour never fire.")
    enabled = serializers.BooleanField(required=False)

    def service_fields(self) -> dict[str, Any]:
        """The validated data under the services' keyword names."""
        names = {"member": "member_id", "server": "server_id"}
        return {names.get(key, key): value for key, value in self.validated_data.items() if key != "workspace"}


class AlertRuleUpdateSerializer(AlertRuleWriteSerializer):
    workspace = None  # a rule stays in its workspace
    kind = serializers.ChoiceField(choices=AlertKind.choices, required=False)
