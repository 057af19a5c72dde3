"""Usage API: grouped usage figures (JSON or CSV), streamed exports, the caller's quota status.

Who sees what: per workspace, an admin sees every user's usage, a member only their own; an
API-key caller only the key's workspace; nobody sees other workspaces. The usage endpoints sit
behind the ``external_mcp_connect`` flag (404 when off); the quota status does not, since the
quota applies to every user.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from django.contrib.auth import get_user_model
from django.db.models import Q
from django.utils import timezone
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, OpenApiResponse, extend_schema
from rest_framework import exceptions
from rest_framework.negotiation import DefaultContentNegotiation
from rest_framework.permissions import IsAuthenticated
from rest_framework.renderers import JSONRenderer
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from external_mcp.models import ExternalMcpServer
from twinmcp.flags import ExternalMcpEnabled
from twinmcp.models import Membership, Role
from twinmcp.pagination import PAGINATION_PARAMETERS, BoundedLimitOffsetPagination
from twinmcp.scoping import key_workspace_ids
from twinmcp.services import profile_ensure
from usage import exports
from usage.limiter import get_limiter
from usage.models import UsageDaily, UsageEvent
from usage.queries import UsageQuery, iso
from usage.quota import QuotaUnavailable
from usage.quota_board import member_quotas
from usage.serializers import (
    QuotaStatusSerializer,
    UsageExportQuerySerializer,
    UsagePageSerializer,
    UsageQuerySerializer,
)

MAX_USER_ID = 2**31 - 1  # auth.User's id column is a PostgreSQL integer


class IgnoreFormatParameter(DefaultContentNegotiation):
    """``format`` is our own parameter here (json, csv, jsonl), not DRF's renderer override; and
    errors are always JSON, whatever the Accept header asks for."""

    def select_renderer(self, request: Request, renderers: list[Any], format_suffix: str | None = None) -> Any:
        return renderers[0], renderers[0].media_type


class ServiceUnavailable(exceptions.APIException):
    status_code = 503
    default_detail = "Quota counters are unavailable; try again shortly."
    default_code = "unavailable"


# -- who may see what ---------------------------------------------------------------------------------


@dataclass
class Scope:
    user_id: int
    admin_of: list[Any] = field(default_factory=list)  # workspace ids where the caller sees everyone
    member_of: list[Any] = field(default_factory=list)  # workspace ids where the caller sees only themself

    @property
    def workspaces(self) -> list[Any]:
        return [*self.admin_of, *self.member_of]

    def q(self) -> Q:
        """Rows the caller may see, over ``workspace_id``/``user_id`` (events and aggregates alike)."""
        return Q(workspace_id__in=self.admin_of) | Q(workspace_id__in=self.member_of, user_id=self.user_id)


def caller_scope(request: Request, slug: str | None) -> Scope:
    rows = list(Membership.objects.filter(user=request.user).values_list("workspace_id", "role", "workspace__slug"))
    restrict = key_workspace_ids(request)
    if restrict is not None:
        rows = [row for row in rows if row[0] in restrict]
    if slug:
        rows = [row for row in rows if row[2] == slug]
        if not rows:
            hint = " with this API key" if restrict is not None else ""
            raise exceptions.ValidationError({"workspace": [f"Unknown workspace {slug[:64]!r}, or not yours{hint}."]})
    scope = Scope(user_id=request.user.pk)
    for workspace_id, role, _ in rows:
        (scope.admin_of if role == Role.ADMIN else scope.member_of).append(workspace_id)
    return scope


def resolve_user(scope: Scope, value: str) -> int:
    """The user id a ``user`` filter names (username or id): the caller, anyone in a workspace the
    caller administers (current members, or past ones with usage there). A member naming another
    member gets a 403; a user the caller shares no workspace with is unknown (400)."""
    users = get_user_model().objects
    candidate = None
    if value.isascii() and value.isdigit() and int(value) <= MAX_USER_ID:
        candidate = users.filter(pk=int(value)).values_list("pk", flat=True).first()
    if candidate is None:
        candidate = users.filter(**{get_user_model().USERNAME_FIELD: value}).values_list("pk", flat=True).first()
    if candidate == scope.user_id:
        return candidate
    if candidate is not None:
        if scope.admin_of and (
            Membership.objects.filter(user_id=candidate, workspace_id__in=scope.admin_of).exists()
            or UsageDaily.objects.filter(user_id=candidate, workspace_id__in=scope.admin_of).exists()
            or UsageEvent.objects.filter(user_id=candidate, workspace_id__in=scope.admin_of).exists()
        ):
            return candidate
        if scope.member_of and Membership.objects.filter(user_id=candidate, workspace_id__in=scope.member_of).exists():
            raise exceptions.PermissionDenied(
                "Members can only see their own usage; ask a workspace admin for other users' figures.")
    raise exceptions.ValidationError({"user": [f"Unknown user {value[:150]!r}."]})


def check_server(scope: Scope, server_id: Any) -> None:
    if not (
        ExternalMcpServer.objects.filter(pk=server_id, workspace_id__in=scope.workspaces).exists()
        or UsageDaily.objects.filter(server_id=server_id).filter(scope.q()).exists()
    ):
        raise exceptions.ValidationError({"server": [f"Unknown server {server_id}."]})


def build_query(request: Request, data: dict[str, Any]) -> UsageQuery:
    scope = caller_scope(request, data["workspace"])
    user_id = resolve_user(scope, data["user"]) if data["user"] else None
    if data.get("server"):
        check_server(scope, data["server"])
    return UsageQuery(start=data["start"], end=data["end"], today=data["today"], scope=scope.q(),
                      group_by=data["group_by"], user_id=user_id, server_id=data.get("server"), tool=data["tool"])


# -- views ------------------------------------------------------------------------------------------------

FILTER_PARAMETERS = [
    OpenApiParameter("user", str, description="Username or user id (members: only themselves)."),
    OpenApiParameter("server", OpenApiTypes.UUID, description="Server id."),
    OpenApiParameter("tool", str, description="Tool name (tools/call)."),
    OpenApiParameter("workspace", str, description="Workspace slug (default: all of the caller's; an API key's own)."),
    OpenApiParameter("start", OpenApiTypes.DATE, description="First UTC day (default: 29 days before end)."),
    OpenApiParameter("end", OpenApiTypes.DATE, description="Last UTC day, inclusive (default: today)."),
    OpenApiParameter("pseudonymize", bool, description="Replace user identities by per-workspace pseudonyms."),
]

LIST_DESCRIPTION = (
    "Usage per workspace and the chosen dimensions (`group_by`, comma-separated: day, user, server, tool; "
    "default day), over UTC days `start`..`end` (inclusive, at most USAGE_MAX_RANGE_DAYS). Figures come from "
    "the daily aggregates plus, for days not finalised yet (today), the raw events recorded since the last "
    "aggregation run, so they are fresh. `totals` cover every group, not just the page. `latency_p95_ms` is "
    "only given when group_by has all of day, user, server and tool (each row is then one bucket; percentiles "
    "of several buckets cannot be derived from theirs). `format=csv` returns every group as a CSV download "
    "(not paginated). Admins see their workspace's users, members only themselves."
)


class UsageView(APIView):
    permission_classes = [IsAuthenticated, ExternalMcpEnabled]
    renderer_classes = [JSONRenderer]
    content_negotiation_class = IgnoreFormatParameter


class UsageList(UsageView):
    @extend_schema(
        operation_id="external_mcp_usage_list",
        description=LIST_DESCRIPTION,
        parameters=[
            *FILTER_PARAMETERS,
            OpenApiParameter("group_by", str, description="Comma-separated: day, user, server, tool."),
            OpenApiParameter("format", str, enum=["json", "csv"]),
            *PAGINATION_PARAMETERS,
        ],
        responses={200: UsagePageSerializer, (200, "text/csv"): OpenApiTypes.STR},
    )
    def get(self, request: Request) -> Any:
        form = UsageQuerySerializer(data=request.query_params)
        form.is_valid(raise_exception=True)
        data = form.validated_data
        query = build_query(request, data)
        if data["format"] == "csv":
            rows = exports.grouped_rows(query, pseudonymize=data["pseudonymize"])
            content = exports.csv_chunks(exports.grouped_columns(query.group_by), rows)
            return exports.streaming_response(request._request, content, fmt="csv",
                                              filename=f"twinmcp-usage-{query.start}-{query.end}")
        paginator = BoundedLimitOffsetPagination()
        paginator.request = request
        paginator.limit = paginator.get_limit(request)
        paginator.offset = paginator.get_offset(request)
        raw_rows, paginator.count, totals = query.page(limit=paginator.limit, offset=paginator.offset,
                                                       pseudonymize=data["pseudonymize"])
        pseudonyms = exports.Pseudonymizer() if data["pseudonymize"] else None
        results = [exports.grouped_row(raw, query.group_by, pseudonyms) for raw in raw_rows]
        return Response({
            "count": paginator.count,
            "next": paginator.get_next_link(),
            "previous": paginator.get_previous_link(),
            "start": query.start.isoformat(),
            "end": query.end.isoformat(),
            "group_by": list(query.group_by),
            "totals": totals,
            "results": results,
        })


@extend_schema(exclude=True)
class UsageListSlash(UsageList):
    """The same with a trailing slash (left out of the schema)."""


class UsageExport(UsageView):
    @extend_schema(
        operation_id="external_mcp_usage_export",
        description=(
            "Streams usage as a download, with constant memory whatever its size: `format` csv (default), json "
            "(one array) or jsonl (JSON Lines). `level=bucket` (default) gives grouped rows as the usage list "
            "does, grouped by day, user, server and tool unless `group_by` says otherwise; `level=event` gives "
            "the raw events still kept (EXTERNAL_MCP_USAGE_RETENTION_DAYS). `pseudonymize=true` replaces user "
            "id, username and email (and the API key id) by a pseudonym stable within a workspace."
        ),
        parameters=[
            *FILTER_PARAMETERS,
            OpenApiParameter("group_by", str, description="Comma-separated: day, user, server, tool."),
            OpenApiParameter("format", str, enum=["csv", "json", "jsonl"]),
            OpenApiParameter("level", str, enum=["bucket", "event"]),
        ],
        responses={
            (200, "text/csv"): OpenApiResponse(OpenApiTypes.STR, description="CSV with a header row."),
            (200, "application/json"): OpenApiResponse(OpenApiTypes.OBJECT, description="A JSON array of rows."),
            (200, "application/x-ndjson"): OpenApiResponse(OpenApiTypes.STR, description="One JSON row per line."),
        },
    )
    def get(self, request: Request) -> Any:
        form = UsageExportQuerySerializer(data=request.query_params)
        form.is_valid(raise_exception=True)
        data = form.validated_data
        query = build_query(request, data)
        pseudonymize = data["pseudonymize"]
        if data["level"] == "event":
            rows = exports.event_rows(query, pseudonymize=pseudonymize)
            columns: list[str] = list(exports.EVENT_COLUMNS)
            name = f"twinmcp-usage-events-{query.start}-{query.end}"
        else:
            rows = exports.grouped_rows(query, pseudonymize=pseudonymize)
            columns = exports.grouped_columns(query.group_by)
            name = f"twinmcp-usage-{query.start}-{query.end}"
        content = exports.chunks(data["format"], columns, rows)
        return exports.streaming_response(request._request, content, fmt=data["format"], filename=name)


@extend_schema(exclude=True)
class UsageExportSlash(UsageExport):
    """The same with a trailing slash (left out of the schema)."""


class QuotaStatus(APIView):
    """Not behind the feature flag: the daily quota applies to every user."""

    permission_classes = [IsAuthenticated]
    renderer_classes = [JSONRenderer]

    @extend_schema(
        operation_id="usage_quota_status",
        description=(
            "The caller's daily quota on proxied tool calls, read from the same counter the proxy's limiter "
            "uses: plan code, limit (null = uncapped), used and remaining today, and the next reset (00:00 UTC). "
            "Any authenticated user (session or API key); not behind the external MCP feature flag."
        ),
        responses={200: QuotaStatusSerializer, 503: OpenApiResponse(description="Quota counters unavailable.")},
    )
    def get(self, request: Request) -> Response:
        plan = profile_ensure(user=request.user).plan
        try:
            decision = get_limiter().peek(request.user.pk, plan.effective_daily_limit)
        except QuotaUnavailable:
            raise ServiceUnavailable() from None
        return Response({"plan": plan.code, "limit": decision.limit, "used": decision.used,
                         "remaining": decision.remaining, "reset_at": iso(decision.reset_at)})


@extend_schema(exclude=True)
class QuotaStatusSlash(QuotaStatus):
    """The same with a trailing slash (left out of the schema)."""


class QuotaMembers(APIView):
    """Not behind the feature flag, like the caller's own quota status."""

    permission_classes = [IsAuthenticated]
    renderer_classes = [JSONRenderer]

    @extend_schema(
        operation_id="usage_quota_members",
        description=(
            "Where each member of a workspace stands against the daily quota: plan, limit (null = uncapped), used "
            "and remaining today from the live counters, the next reset (00:00 UTC), and `quota_rejections`: calls "
            "the quota refused over UTC days `start`..`end` (default: the last 30 days). Admins get every member, "
            "a member only themself. `workspace` (slug) defaults to the first workspace the caller administers."
        ),
        parameters=[
            OpenApiParameter("workspace", str, description="Workspace slug."),
            OpenApiParameter("start", OpenApiTypes.DATE, description="First UTC day of the refusal count."),
            OpenApiParameter("end", OpenApiTypes.DATE, description="Last UTC day, inclusive (default: today)."),
        ],
        responses={200: OpenApiTypes.OBJECT, 503: OpenApiResponse(description="Quota counters unavailable.")},
    )
    def get(self, request: Request) -> Response:
        form = UsageQuerySerializer(data=request.query_params)
        form.is_valid(raise_exception=True)
        data = form.validated_data
        memberships = Membership.objects.filter(user=request.user).select_related("workspace")
        restrict = key_workspace_ids(request)
        if restrict is not None:
            memberships = memberships.filter(workspace_id__in=restrict)
        if data["workspace"]:
            memberships = memberships.filter(workspace__slug=data["workspace"])
        membership = memberships.order_by("role", "workspace__slug").first()  # "admin" sorts first
        if membership is None:
            raise exceptions.ValidationError({"workspace": ["Unknown workspace, or not yours." if data["workspace"]
                                                            else "You are not a member of any workspace."]})
        try:
            rows = member_quotas(workspace_id=membership.workspace_id, viewer_id=request.user.pk,
                                 viewer_is_admin=membership.role == Role.ADMIN, start=data["start"], end=data["end"],
                                 now=timezone.now())
        except QuotaUnavailable:
            raise ServiceUnavailable() from None
        return Response({"workspace": membership.workspace.slug, "start": data["start"].isoformat(),
                         "end": data["end"].isoformat(), "results": [row.as_json() for row in rows]})
