"""Usage alerts: rules an admin sets on the workspace's raw usage events, and their evaluation.

Evaluation (``alerts_evaluate``, run by beat every minute) reads the enabled rules, then one
aggregate query per rule kind over all their workspaces, never one per member or server. Each
breach is a row of ``AlertBreach`` keyed by (rule, subject, window): the worker that inserts it
notifies the admins in the same transaction, any other run (a rerun, a second worker) finds the
row and stays quiet. Windows are UTC: the day for tool calls and quota rejections, the hour of
detection for the error rate (measured over the sliding last 60 minutes).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from datetime import time as dt_time
from typing import Any

from django.contrib.auth import get_user_model
from django.contrib.auth.models import AbstractBaseUser
from django.core.exceptions import ValidationError
from django.db import transaction
from django.db.models import Count, Q
from django.db.models.functions import TruncDate
from django.utils import timezone

from external_mcp.choices import AuditAction, NotificationKind
from external_mcp.models import AuditEvent, ExternalMcpServer
from external_mcp.notifications import notify_admins
from twinmcp.models import Membership, Workspace
from usage.models import ERROR_OUTCOMES, AlertBreach, AlertKind, AlertRule, Outcome, UsageEvent

EDITABLE_FIELDS = ("kind", "member_id", "server_id", "threshold", "min_calls", "enabled")
MAX_CALLS_THRESHOLD = 10_000_000
MAX_MIN_CALLS = 1_000_000
ERROR_RATE_WINDOW = timedelta(hours=1)
DAY_LOOKBACK = timedelta(minutes=10)
"""After midnight, yesterday is still evaluated this long: calls of its last minute count too."""
TOOL_CALL = "tools/call"


# -- rules: validation, writes ----------------------------------------------------------------------


def _whole(value: Any, field: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ValidationError({field: [f"A whole number from {low} to {high} is expected."]})
    try:
        number = int(value)
    except ValueError:
        raise ValidationError({field: [f"A whole number from {low} to {high} is expected."]}) from None
    if not low <= number <= high:
        raise ValidationError({field: [f"A whole number from {low} to {high} is expected."]})
    return number


def _member_id(workspace: Workspace, value: Any) -> int | None:
    """A user id, or a username (the API's way to name a member)."""
    if value in (None, ""):
        return None
    refused = ValidationError({"member": ["Choose a member of this workspace."]})
    if isinstance(value, str) and value.isascii() and value.isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise refused
    members = Membership.objects.filter(workspace=workspace)
    if isinstance(value, int):
        if not 0 < value < 2**63:
            raise refused
        found = members.filter(user_id=value)
    elif "\x00" in value:
        raise refused
    else:
        found = members.filter(user__username=value)
    user_id = found.values_list("user_id", flat=True).first()
    if user_id is None:
        raise refused
    return user_id


def _server_id(workspace: Workspace, value: Any) -> uuid.UUID | None:
    if value in (None, ""):
        return None
    try:
        server_id = value if isinstance(value, uuid.UUID) else uuid.UUID(str(value))
    except ValueError:
        raise ValidationError({"server": ["Choose a server of this workspace."]}) from None
    if not ExternalMcpServer.objects.filter(workspace=workspace, pk=server_id).exists():
        raise ValidationError({"server": ["Choose a server of this workspace."]})
    return server_id


def _clean(rule: AlertRule, fields: dict[str, Any]) -> dict[str, Any]:
    """Validate the fields against the rule's kind, set them, and return what changed (for the audit)."""
    kind = fields.get("kind", rule.kind)
    if kind not in AlertKind.values:
        raise ValidationError({"kind": [f"Choose one of {', '.join(AlertKind.values)}."]})
    wanted: dict[str, Any] = {"kind": kind}
    member_id = _member_id(rule.workspace, fields.get("member_id", rule.member_id))
    server_id = _server_id(rule.workspace, fields.get("server_id", rule.server_id))
    threshold = fields.get("threshold", rule.threshold)
    if kind == AlertKind.SERVER_ERROR_RATE:
        if member_id is not None:
            raise ValidationError({"member": ["An error-rate rule watches servers, not members."]})
        wanted.update(member_id=None, server_id=server_id, threshold=_whole(threshold, "threshold", 1, 100),
                      min_calls=_whole(fields.get("min_calls", rule.min_calls), "min_calls", 1, MAX_MIN_CALLS))
    else:
        if server_id is not None:
            raise ValidationError({"server": ["Only an error-rate rule watches a server."]})
        wanted.update(member_id=member_id, server_id=None)
        if kind == AlertKind.MEMBER_DAILY_CALLS:
            wanted["threshold"] = _whole(threshold, "threshold", 1, MAX_CALLS_THRESHOLD)
        else:
            wanted["threshold"] = 0  # the first rejection fires
    enabled = fields.get("enabled", rule.enabled)
    if not isinstance(enabled, bool):
        raise ValidationError({"enabled": ["true or false is expected."]})
    wanted["enabled"] = enabled
    changes: dict[str, Any] = {}
    for key, value in wanted.items():
        if getattr(rule, key) != value:
            changes[key] = str(value) if isinstance(value, uuid.UUID) else value
            setattr(rule, key, value)
    return changes


def _snapshot(rule: AlertRule) -> dict[str, Any]:
    return {"kind": rule.kind, "member_id": rule.member_id,
            "server_id": str(rule.server_id) if rule.server_id else None, "threshold": rule.threshold,
            "min_calls": rule.min_calls, "enabled": rule.enabled}


def _audit(*, rule: AlertRule, actor: AbstractBaseUser | None, action: str, changes: dict[str, Any]) -> None:
    AuditEvent.objects.create(workspace_id=rule.workspace_id, server=None, server_name="", actor=actor,
                              action=action, changes={"alert_rule": str(rule.pk), **changes})


@transaction.atomic
def alert_rule_create(
    *,
    workspace: Workspace,
    actor: AbstractBaseUser | None,
    kind: str,
    threshold: Any = 0,
    member_id: Any = None,
    server_id: Any = None,
    min_calls: Any = 20,
    enabled: bool = True,
) -> AlertRule:
    """``member_id`` (a user of the workspace) or ``server_id`` (one of its servers) left out means
    any member, or every server."""
    rule = AlertRule(workspace=workspace)
    _clean(rule, {"kind": kind, "threshold": threshold, "member_id": member_id, "server_id": server_id,
                  "min_calls": min_calls, "enabled": enabled})
    rule.save()
    _audit(rule=rule, actor=actor, action=AuditAction.ALERT_RULE_CREATE, changes=_snapshot(rule))
    return rule


@transaction.atomic
def alert_rule_update(*, rule: AlertRule, actor: AbstractBaseUser | None, **fields: Any) -> AlertRule:
    """Change any of ``EDITABLE_FIELDS`` (``enabled`` alone enables or disables the rule)."""
    for key in fields:
        if key not in EDITABLE_FIELDS:
            raise ValidationError({key: ["This field cannot be changed here."]})
    rule = AlertRule.objects.select_for_update().select_related("workspace").get(pk=rule.pk)
    changes = _clean(rule, fields)
    if changes:
        rule.updated_at = timezone.now()
        rule.save()
        _audit(rule=rule, actor=actor, action=AuditAction.ALERT_RULE_UPDATE, changes=changes)
    return rule


@transaction.atomic
def alert_rule_delete(*, rule: AlertRule, actor: AbstractBaseUser | None) -> None:
    _audit(rule=rule, actor=actor, action=AuditAction.ALERT_RULE_DELETE, changes=_snapshot(rule))
    rule.delete()


def describe(rule: AlertRule) -> str:
    """The rule in one sentence, for its list and its notifications (``member`` and ``server`` loaded)."""
    if rule.kind == AlertKind.MEMBER_DAILY_CALLS:
        who = rule.member.get_username() if rule.member else "Any member"
        return f"{who} makes more than {rule.threshold} tool calls in a UTC day"
    if rule.kind == AlertKind.SERVER_ERROR_RATE:
        what = rule.server.name if rule.server else "Any server"
        return f"{what} fails more than {rule.threshold}% of at least {rule.min_calls} requests in an hour"
    who = rule.member.get_username() if rule.member else "Anyone"
    return f"{who} is refused a call by the daily quota"


# -- evaluation -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Breach:
    rule: AlertRule
    subject: str
    """``member:<user id>`` or ``server:<server id>``."""
    window_start: datetime
    value: float
    title: str
    body: str

    @property
    def dedup_key(self) -> str:
        return f"usage-alert:{self.rule.pk}:{self.subject}:{self.window_start:%Y-%m-%dT%H}"


def _day_start(day: date) -> datetime:
    return datetime.combine(day, dt_time.min, tzinfo=UTC)


def _per_member_day(rules: list[AlertRule], now: datetime, outcome: str | None) -> dict[tuple, int]:
    """(workspace id, user id, UTC day) -> tool calls (of ``outcome``, if given) today, and yesterday
    shortly after midnight: one query for every rule of a kind."""
    since = _day_start((now - DAY_LOOKBACK).date())
    events = UsageEvent.objects.filter(workspace_id__in={r.workspace_id for r in rules}, created_at__gte=since,
                                       created_at__lte=now, user_id__isnull=False)
    events = events.filter(outcome=outcome) if outcome else events.filter(method=TOOL_CALL)
    rows = (events.annotate(day=TruncDate("created_at", tzinfo=UTC)).values("workspace_id", "user_id", "day")
            .annotate(n=Count("id")).order_by())
    return {(row["workspace_id"], row["user_id"], row["day"]): row["n"] for row in rows}


def _member_breaches(rules: list[AlertRule], counts: dict[tuple, int]) -> Iterable[tuple[AlertRule, int, date, int]]:
    for (workspace_id, user_id, day), n in counts.items():
        for rule in rules:
            if rule.workspace_id != workspace_id or rule.member_id not in (None, user_id):
                continue
            if n > rule.threshold:
                yield rule, user_id, day, n


def _usernames(user_ids: set[int]) -> dict[int, str]:
    users = get_user_model().objects.filter(pk__in=user_ids)
    return {user.pk: user.get_username() for user in users}


def _daily_breaches(rules: list[AlertRule], now: datetime) -> list[Breach]:
    by_kind: dict[str, list[AlertRule]] = {}
    for rule in rules:
        by_kind.setdefault(rule.kind, []).append(rule)
    found: list[tuple[AlertRule, int, date, int]] = []
    if by_kind.get(AlertKind.MEMBER_DAILY_CALLS):
        calls = by_kind[AlertKind.MEMBER_DAILY_CALLS]
        found += _member_breaches(calls, _per_member_day(calls, now, None))
    if by_kind.get(AlertKind.QUOTA_REJECTION):
        quota = by_kind[AlertKind.QUOTA_REJECTION]
        found += _member_breaches(quota, _per_member_day(quota, now, Outcome.QUOTA))
    names = _usernames({user_id for _, user_id, _, _ in found}) if found else {}
    breaches = []
    for rule, user_id, day, n in found:
        who = names.get(user_id, f"user {user_id}")
        if rule.kind == AlertKind.MEMBER_DAILY_CALLS:
            title = f"{who} made {n} tool calls on {day:%Y-%m-%d} (UTC), more than {rule.threshold}"
        else:
            title = f"{who} was refused {n} call{'s' if n != 1 else ''} by the daily quota on {day:%Y-%m-%d} (UTC)"
        body = (f"Usage alert in {rule.workspace.name}: {describe(rule)}.\n"
                f"Seen at the check; later calls that day do not notify again. See the Usage page.")
        breaches.append(Breach(rule, f"member:{user_id}", _day_start(day), float(n), title, body))
    return breaches


def _error_rate_breaches(rules: list[AlertRule], now: datetime) -> list[Breach]:
    rows = (UsageEvent.objects.filter(workspace_id__in={r.workspace_id for r in rules},
                                      created_at__gt=now - ERROR_RATE_WINDOW, created_at__lte=now,
                                      server_id__isnull=False)
            .values("workspace_id", "server_id")
            .annotate(requests=Count("id"), errors=Count("id", filter=Q(outcome__in=ERROR_OUTCOMES))).order_by())
    found = []
    for row in rows:
        requests, errors = row["requests"], row["errors"]
        for rule in rules:
            if rule.workspace_id != row["workspace_id"] or rule.server_id not in (None, row["server_id"]):
                continue
            if requests >= rule.min_calls and errors * 100 > rule.threshold * requests:
                found.append((rule, row["server_id"], requests, errors))
    # A server moved to another workspace since keeps its events here, but not its name.
    servers = ExternalMcpServer.objects.filter(pk__in={f[1] for f in found}).only("id", "workspace_id", "name") \
        if found else []
    names = {(s.workspace_id, s.pk): s.name for s in servers}
    hour = now.replace(minute=0, second=0, microsecond=0)
    breaches = []
    for rule, server_id, requests, errors in found:
        rate = 100 * errors / requests
        name = names.get((rule.workspace_id, server_id), "A server no longer in this workspace")
        title = f"{name} failed {rate:.0f}% of its requests in the last hour ({errors} of {requests})"
        body = (f"Usage alert in {rule.workspace.name}: {describe(rule)}.\n"
                f"Errors are the outcomes error, timeout and upstream_error. "
                f"It notifies at most once per UTC hour while it lasts. See the server's page and the Usage page.")
        breaches.append(Breach(rule, f"server:{server_id}", hour, round(rate, 2), title, body))
    return breaches


def _record(breach: Breach, now: datetime) -> bool:
    """Notify the breach unless a run already did: True when this call notified."""
    with transaction.atomic():
        _, created = AlertBreach.objects.get_or_create(
            rule=breach.rule, subject=breach.subject, window_start=breach.window_start,
            defaults={"value": breach.value, "detected_at": now})
        if created:
            notify_admins(workspace_id=breach.rule.workspace_id, kind=NotificationKind.USAGE_ALERT,
                          title=breach.title, body=breach.body, dedup_key=breach.dedup_key)
    return created


def breaches_find(*, now: datetime | None = None) -> list[Breach]:
    """Every breach of an enabled rule now, notified or not (reads only)."""
    now = now or timezone.now()
    rules = list(AlertRule.objects.filter(enabled=True).select_related("workspace", "member", "server"))
    daily = [r for r in rules if r.kind in (AlertKind.MEMBER_DAILY_CALLS, AlertKind.QUOTA_REJECTION)]
    error_rate = [r for r in rules if r.kind == AlertKind.SERVER_ERROR_RATE]
    return (_daily_breaches(daily, now) if daily else []) + (_error_rate_breaches(error_rate, now) if error_rate
                                                              else [])


def alerts_evaluate(*, now: datetime | None = None) -> int:
    """Notify each new breach once; returns how many this run notified. Rerunnable, and safe on
    two workers at once (see the module docstring)."""
    now = now or timezone.now()
    return sum(_record(breach, now) for breach in breaches_find(now=now))
