"""Query-string forms and response shapes of the usage API (validation only: no side effects)."""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.utils import timezone
from rest_framework import serializers

from usage.queries import GROUP_DIMENSIONS, range_start

DATE_FORMATS = ["%Y-%m-%d"]
DEFAULT_RANGE_DAYS = 30


def parse_group_by(value: str, default: tuple[str, ...]) -> tuple[str, ...]:
    items = [item.strip().lower() for item in value.split(",") if item.strip()]
    if not items:
        return default
    unknown = [item for item in items if item not in GROUP_DIMENSIONS]
    if unknown:
        raise serializers.ValidationError(
            f"Unknown value {unknown[0][:40]!r}; group_by is a comma-separated list of {', '.join(GROUP_DIMENSIONS)}."
        )
    return tuple(dict.fromkeys(items))  # deduplicated, order kept


class UsageQuerySerializer(serializers.Serializer):
    """Filters shared by the usage list and the exports. Dates are UTC days, both inclusive;
    the default range is the last 30 days (today included)."""

    DEFAULT_GROUP_BY: tuple[str, ...] = ("day",)
    FORMATS = ("json", "csv")

    user = serializers.CharField(required=False, allow_blank=True, max_length=150,
                                 help_text="Username or numeric user id.")
    server = serializers.UUIDField(required=False, help_text="Server id.")
    tool = serializers.CharField(required=False, allow_blank=True, max_length=200)
    workspace = serializers.CharField(required=False, allow_blank=True, max_length=64, help_text="Workspace slug.")
    start = serializers.DateField(required=False, input_formats=DATE_FORMATS, help_text="YYYY-MM-DD (UTC).")
    end = serializers.DateField(required=False, input_formats=DATE_FORMATS, help_text="YYYY-MM-DD (UTC).")
    group_by = serializers.CharField(required=False, allow_blank=True, max_length=100)
    format = serializers.CharField(required=False, allow_blank=True, max_length=20)
    pseudonymize = serializers.BooleanField(required=False, default=False)

    def validate_group_by(self, value: str) -> tuple[str, ...]:
        return parse_group_by(value, self.DEFAULT_GROUP_BY)

    def validate_format(self, value: str) -> str:
        value = value.strip().lower() or self.FORMATS[0]
        if value not in self.FORMATS:
            raise serializers.ValidationError(f"Choose one of {', '.join(self.FORMATS)}.")
        return value

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        today = timezone.now().date()
        maximum = settings.USAGE_MAX_RANGE_DAYS
        end = attrs.get("end") or today
        start = attrs.get("start") or range_start(end, DEFAULT_RANGE_DAYS)
        if end < start:
            raise serializers.ValidationError({"end": [f"end ({end}) is before start ({start})."]})
        days = (end - start).days + 1
        if days > maximum:
            name = "start" if attrs.get("start") else "end"
            raise serializers.ValidationError(
                {name: [f"The range {start}..{end} spans {days} days; at most {maximum} are allowed."]})
        attrs["start"], attrs["end"], attrs["today"] = start, end, today
        attrs.setdefault("group_by", self.DEFAULT_GROUP_BY)
        attrs["format"] = attrs.get("format") or self.FORMATS[0]
        for name in ("user", "tool", "workspace"):
            attrs[name] = (attrs.get(name) or "").strip() or None
        return attrs


class UsageExportQuerySerializer(UsageQuerySerializer):
    """The export adds JSON Lines and the event level; its rows default to whole buckets."""

    DEFAULT_GROUP_BY = ("day", "user", "server", "tool")
    FORMATS = ("csv", "json", "jsonl")
    LEVELS = ("bucket", "event")

    level = serializers.CharField(required=False, allow_blank=True, max_length=20,
                                  help_text="bucket (aggregates, default) or event (raw events, within retention).")

    def validate_level(self, value: str) -> str:
        value = value.strip().lower() or self.LEVELS[0]
        if value not in self.LEVELS:
            raise serializers.ValidationError(f"Choose one of {', '.join(self.LEVELS)}.")
        return value

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        attrs = super().validate(attrs)
        attrs["level"] = attrs.get("level") or self.LEVELS[0]
        return attrs


# -- response shapes (documentation) -----------------------------------------------------------------


class UsageTotalsSerializer(serializers.Serializer):
    requests = serializers.IntegerField()
    counted = serializers.IntegerField(help_text="Uses counted against the daily quota.")
    errors = serializers.IntegerField(help_text="Outcomes error, timeout and upstream_error.")
    quota_rejections = serializers.IntegerField()
    blocked = serializers.IntegerField()
    tokens_in = serializers.IntegerField()
    tokens_out = serializers.IntegerField()
    bytes_in = serializers.IntegerField()
    bytes_out = serializers.IntegerField()
    latency_avg_ms = serializers.FloatField(allow_null=True)
    latency_p95_ms = serializers.FloatField(
        allow_null=True,
        help_text="Only when grouped by day, user, server and tool (one bucket per row; in totals, when there is "
                  "a single bucket): percentiles of several buckets cannot be derived from theirs.")
    first_at = serializers.DateTimeField(allow_null=True)
    last_at = serializers.DateTimeField(allow_null=True)
    timeouts = serializers.IntegerField(help_text="Outcome timeout (also counted in errors).")
    upstream_errors = serializers.IntegerField(help_text="Outcome upstream_error (also counted in errors).")
    client_disconnects = serializers.IntegerField(help_text="Outcome client_disconnect.")
    outcomes = serializers.DictField(
        child=serializers.IntegerField(),
        help_text="Requests per outcome: ok, error, quota, blocked, timeout, upstream_error, client_disconnect; "
                  "they add up to requests (ok is what no other outcome claims).")


class UsageRowSerializer(UsageTotalsSerializer):
    workspace = serializers.CharField(help_text="Workspace slug (rows are always per workspace).")
    day = serializers.DateField(required=False, help_text="With group_by day.")
    user_id = serializers.CharField(required=False, help_text="With group_by user: the id, or its pseudonym.")
    username = serializers.CharField(required=False, allow_null=True)
    email = serializers.CharField(required=False, allow_null=True)
    server_id = serializers.UUIDField(required=False, allow_null=True)
    server_name = serializers.CharField(required=False, allow_null=True)
    tool = serializers.CharField(required=False)
    unique_tools = serializers.IntegerField(required=False, help_text="Distinct tools used (when not grouped by tool).")
    error_rate = serializers.FloatField(required=False, help_text="errors / requests.")


class UsagePageSerializer(serializers.Serializer):
    count = serializers.IntegerField(help_text="Number of groups.")
    next = serializers.URLField(allow_null=True)
    previous = serializers.URLField(allow_null=True)
    start = serializers.DateField()
    end = serializers.DateField()
    group_by = serializers.ListField(child=serializers.CharField())
    totals = UsageTotalsSerializer()
    results = UsageRowSerializer(many=True)


class QuotaStatusSerializer(serializers.Serializer):
    plan = serializers.CharField()
    limit = serializers.IntegerField(allow_null=True, help_text="Counted uses per UTC day; null = uncapped.")
    used = serializers.IntegerField()
    remaining = serializers.IntegerField(allow_null=True)
    reset_at = serializers.DateTimeField(help_text="Next 00:00 UTC.")
