"""REST API of the server registry. Thin: permissions and shapes here, rules in services."""

from __future__ import annotations

from typing import Any

from django.db.models import Prefetch, Q, QuerySet
from django.http import Http404
from django.utils import timezone
from drf_spectacular.utils import OpenApiParameter, extend_schema
from rest_framework import status
from rest_framework.exceptions import PermissionDenied, ValidationError
from rest_framework.permissions import IsAuthenticated
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from external_mcp import catalog, connections, health, services, toolsets
from external_mcp.choices import AuthType, ServerStatus, ToolState
from external_mcp.models import Connection, ExternalMcpServer, ExternalMcpTool, Toolset
from external_mcp.oauth import flow
from external_mcp.serializers import (
    AuthorizationUrlSerializer,
    ChecksSerializer,
    ConnectionSerializer,
    CredentialsRotateSerializer,
    HealthCheckSerializer,
    OwnConnectionSerializer,
    ServerFilterSerializer,
    ServerSerializer,
    ServerUpdateSerializer,
    ServerWriteSerializer,
    StatusChangeSerializer,
    TestResultSerializer,
    ToolApproveSerializer,
    ToolNamesSerializer,
    ToolSerializer,
    ToolsetSerializer,
    ToolsetUpdateSerializer,
    ToolsetWriteSerializer,
)
from twinmcp.flags import ExternalMcpEnabled
from twinmcp.models import Membership, Role
from twinmcp.pagination import PAGINATION_PARAMETERS, BoundedLimitOffsetPagination
from twinmcp.scoping import key_workspace_ids, resolve_workspace


class ExternalMcpView(APIView):
    permission_classes = [IsAuthenticated, ExternalMcpEnabled]

    def servers(self) -> QuerySet[ExternalMcpServer]:
        return (
            ExternalMcpServer.objects.visible_to(self.request.user, key_workspace_ids(self.request))
            .select_related("workspace", "created_by", "credential")
        )

    def get_server(self, server_id: Any) -> ExternalMcpServer:
        server = self.servers().filter(pk=server_id).first()
        if server is None:
            raise Http404
        return server

    changed = "servers"

    def require_admin(self, target: ExternalMcpServer | Toolset) -> None:
        if not Membership.objects.filter(
            user=self.request.user, workspace_id=target.workspace_id, role=Role.ADMIN
        ).exists():
            raise PermissionDenied(f"Only workspace admins can change {self.changed}.")


class ServerListCreate(ExternalMcpView):
    @extend_schema(
        parameters=[
            OpenApiParameter("status", str, enum=ServerStatus.values),
            OpenApiParameter("tag", str),
            OpenApiParameter("search", str),
            *PAGINATION_PARAMETERS,
        ],
        responses=ServerSerializer(many=True),
    )
    def get(self, request: Request) -> Response:
        filters = ServerFilterSerializer(data=request.query_params)
        filters.is_valid(raise_exception=True)
        servers = self.servers()
        if status_ := filters.validated_data.get("status"):
            servers = servers.shown_as(status_, timezone.now())
        if tag := filters.validated_data.get("tag"):
            servers = servers.with_tag(tag)
        if text := filters.validated_data.get("search"):
            servers = servers.search(text)
        paginator = BoundedLimitOffsetPagination()
        page = paginator.paginate_queryset(servers.order_by("name"), request, view=self)
        return paginator.get_paginated_response(ServerSerializer(page, many=True).data)

    @extend_schema(request=ServerWriteSerializer, responses={201: ServerSerializer})
    def post(self, request: Request) -> Response:
        form = ServerWriteSerializer(data=request.data)
        form.is_valid(raise_exception=True)
        data = dict(form.validated_data)
        workspace = resolve_workspace(request, data.pop("workspace", None), admin=True)
        server = services.server_create(workspace=workspace, actor=request.user, **data)
        return Response(ServerSerializer(self.get_server(server.pk)).data, status=status.HTTP_201_CREATED)


class ServerDetail(ExternalMcpView):
    @extend_schema(responses=ServerSerializer)
    def get(self, request: Request, server_id: Any) -> Response:
        return Response(ServerSerializer(self.get_server(server_id)).data)

    @extend_schema(request=ServerUpdateSerializer, responses=ServerSerializer)
    def patch(self, request: Request, server_id: Any) -> Response:
        server = self.get_server(server_id)
        self.require_admin(server)
        form = ServerUpdateSerializer(data=request.data, partial=True)
        form.is_valid(raise_exception=True)
        data = dict(form.validated_data)
        data.pop("workspace", None)
        services.server_update(server=server, actor=request.user, **data)
        return Response(ServerSerializer(self.get_server(server_id)).data)

    @extend_schema(responses={204: None})
    def delete(self, request: Request, server_id: Any) -> Response:
        server = self.get_server(server_id)
        self.require_admin(server)
        services.server_delete(server=server, actor=request.user)
        return Response(status=status.HTTP_204_NO_CONTENT)


class ServerCredentials(ExternalMcpView):
    @extend_schema(request=CredentialsRotateSerializer, responses=ServerSerializer)
    def put(self, request: Request, server_id: Any) -> Response:
        server = self.get_server(server_id)
        self.require_admin(server)
        form = CredentialsRotateSerializer(data=request.data)
        form.is_valid(raise_exception=True)
        services.credentials_rotate(
            server=server,
            actor=request.user,
            credentials=form.validated_data["credentials"],
            auth_type=form.validated_data.get("auth_type"),
            expires_at=form.validated_data.get("expires_at"),
        )
        return Response(ServerSerializer(self.get_server(server_id)).data)


class ServerOAuthStart(ExternalMcpView):
    """Start connecting an account (oauth2): the workspace's (admins) or, with per-user credentials,
    the caller's own. Needs a browser session: the callback comes back to the signed-in user."""

    @extend_schema(request=None, responses={200: AuthorizationUrlSerializer})
    def post(self, request: Request, server_id: Any) -> Response:
        server = self.get_server(server_id)
        try:
            url = flow.authorization_start(server=server, user=request.user)
        except flow.AuthorizationFailed as exc:
            return Response({"detail": str(exc), "field": exc.field}, status=exc.status)
        return Response({"authorization_url": url})


class ServerConnections(ExternalMcpView):
    """Who is connected to a server: admins see every connection, members their own and the
    workspace's; never a token."""

    @extend_schema(responses=ConnectionSerializer(many=True))
    def get(self, request: Request, server_id: Any) -> Response:
        server = self.get_server(server_id)
        rows = server.connections.select_related("user", "connected_by").order_by("connected_at")
        if not connections.is_admin(server=server, user=request.user):
            rows = rows.filter(Q(user=request.user) | Q(user__isnull=True))
        return Response(ConnectionSerializer(rows, many=True).data)


class ServerOwnConnection(ExternalMcpView):
    """The caller's own connection to a per-user server: enter a secret (PUT) or disconnect (DELETE).
    DELETE on a shared server disconnects the workspace's account (admins)."""

    @extend_schema(request=OwnConnectionSerializer, responses=ConnectionSerializer)
    def put(self, request: Request, server_id: Any) -> Response:
        server = self.get_server(server_id)
        form = OwnConnectionSerializer(data=request.data)
        form.is_valid(raise_exception=True)
        if not server.per_user or server.auth_type == AuthType.OAUTH2:
            raise ValidationError({"credentials": ["This server takes no secret per member"
                                                   + (": connect with oauth/start/." if server.per_user else ".")]})
        row = connections.connection_save_secret(server=server, user=request.user,
                                                 credentials=form.validated_data["credentials"])
        return Response(ConnectionSerializer(row).data)

    @extend_schema(responses={204: None})
    def delete(self, request: Request, server_id: Any) -> Response:
        server = self.get_server(server_id)
        if not server.per_user:
            self.require_admin(server)
        row = Connection.objects.used_by(server, request.user.pk).first()
        if row is None:
            raise Http404
        connections.connection_delete(connection=row, actor=request.user)
        return Response(status=status.HTTP_204_NO_CONTENT)


class ServerConnectionDetail(ExternalMcpView):
    """An admin disconnects any connection of the server (a member who left, a leaked device)."""

    @extend_schema(responses={204: None})
    def delete(self, request: Request, server_id: Any, connection_id: Any) -> Response:
        server = self.get_server(server_id)
        self.require_admin(server)
        row = server.connections.filter(pk=connection_id).first()
        if row is None:
            raise Http404
        connections.connection_delete(connection=row, actor=request.user)
        return Response(status=status.HTTP_204_NO_CONTENT)


class ServerTest(ExternalMcpView):
    """Run one check now and return what it found (admins only; bounded by the health timeout)."""

    @extend_schema(request=None, responses=TestResultSerializer)
    def post(self, request: Request, server_id: Any) -> Response:
        server = self.get_server(server_id)
        self.require_admin(server)
        result, server = health.check_now(server)
        server = self.get_server(server_id)
        data = {
            "ok": result.ok, "error_class": result.error_class, "error_message": result.error_message,
            "hint": result.hint, "protocol_version": result.protocol_version, "era": result.era,
            "transport": result.transport, "server_name": result.server_name, "server_version": result.server_version,
            "latency_ms": result.total_ms, "timings_ms": result.timings_ms, "status": server.status,
            "server": ServerSerializer(server).data,
            "tools": tools_data(server, server.tools.exclude(state=ToolState.REMOVED)),
        }
        return Response(data)


def tools_data(server: ExternalMcpServer, tools: QuerySet[ExternalMcpTool]) -> Any:
    return ToolSerializer(tools, many=True, context={"exposed_names": catalog.exposed_names_of(server)}).data


class ServerTools(ExternalMcpView):
    @extend_schema(responses=ToolSerializer(many=True))
    def get(self, request: Request, server_id: Any) -> Response:
        server = self.get_server(server_id)
        return Response(tools_data(server, server.tools.all()))


class ServerToolsApprove(ExternalMcpView):
    @extend_schema(request=ToolApproveSerializer, responses=ToolSerializer(many=True))
    def post(self, request: Request, server_id: Any) -> Response:
        server = self.get_server(server_id)
        self.require_admin(server)
        form = ToolApproveSerializer(data=request.data)
        form.is_valid(raise_exception=True)
        catalog.tools_approve(server=server, actor=request.user, names=form.validated_data.get("names"),
                              select_all=form.validated_data["all"])
        return Response(tools_data(server, server.tools.all()))


class ServerToolsSwitch(ExternalMcpView):
    """Disable approved tools (no agent may call them, on any endpoint, from the next request) or
    enable disabled ones again. Admins only."""

    switch = staticmethod(catalog.tools_disable)

    @extend_schema(request=ToolNamesSerializer, responses=ToolSerializer(many=True))
    def post(self, request: Request, server_id: Any) -> Response:
        server = self.get_server(server_id)
        self.require_admin(server)
        form = ToolNamesSerializer(data=request.data)
        form.is_valid(raise_exception=True)
        self.switch(server=server, actor=request.user, names=form.validated_data["names"])
        return Response(tools_data(server, server.tools.all()))


class ServerToolsEnable(ServerToolsSwitch):
    switch = staticmethod(catalog.tools_enable)


class ServerChecks(ExternalMcpView):
    @extend_schema(responses=ChecksSerializer)
    def get(self, request: Request, server_id: Any) -> Response:
        server = self.get_server(server_id)
        data = {
            "checks": HealthCheckSerializer(server.checks.all()[:50], many=True).data,
            "status_changes": StatusChangeSerializer(server.status_changes.all()[:50], many=True).data,
        }
        return Response(data)


class ToolsetView(ExternalMcpView):
    """Toolsets of the caller's workspaces (the key's only): members read, admins write."""

    changed = "toolsets"

    def toolsets(self) -> QuerySet[Toolset]:
        found = Toolset.objects.visible_to(self.request.user)
        restrict = key_workspace_ids(self.request)
        if restrict is not None:
            found = found.filter(workspace_id__in=restrict)
        return found.select_related("workspace", "created_by").prefetch_related(
            Prefetch("servers", queryset=ExternalMcpServer.objects.only("id", "name", "prefix")),
            Prefetch("tools", queryset=ExternalMcpTool.objects.only("id", "server_id", "name")),
        )

    def get_toolset(self, toolset_id: Any) -> Toolset:
        toolset = self.toolsets().filter(pk=toolset_id).first()
        if toolset is None:
            raise Http404
        return toolset


    def shown(self, toolset_id: Any) -> dict[str, Any]:
        toolset = self.get_toolset(toolset_id)
        context = {"request": self.request, "served": {toolset.pk: toolsets.served_view(toolset)}}
        return ToolsetSerializer(toolset, context=context).data


class ToolsetListCreate(ToolsetView):
    @extend_schema(parameters=PAGINATION_PARAMETERS, responses=ToolsetSerializer(many=True))
    def get(self, request: Request) -> Response:
        paginator = BoundedLimitOffsetPagination()
        page = paginator.paginate_queryset(self.toolsets().order_by("name", "id"), request, view=self)
        context = {"request": request, "served": toolsets.served_many(page)}
        return paginator.get_paginated_response(ToolsetSerializer(page, many=True, context=context).data)

    @extend_schema(request=ToolsetWriteSerializer, responses={201: ToolsetSerializer})
    def post(self, request: Request) -> Response:
        form = ToolsetWriteSerializer(data=request.data)
        form.is_valid(raise_exception=True)
        data = dict(form.validated_data)
        workspace = resolve_workspace(request, data.pop("workspace", None), admin=True)
        toolset = toolsets.toolset_create(workspace=workspace, actor=request.user, **data)
        return Response(self.shown(toolset.pk), status=status.HTTP_201_CREATED)


class ToolsetDetail(ToolsetView):
    @extend_schema(responses=ToolsetSerializer)
    def get(self, request: Request, toolset_id: Any) -> Response:
        return Response(self.shown(toolset_id))

    @extend_schema(request=ToolsetUpdateSerializer, responses=ToolsetSerializer)
    def patch(self, request: Request, toolset_id: Any) -> Response:
        toolset = self.get_toolset(toolset_id)
        self.require_admin(toolset)
        form = ToolsetUpdateSerializer(data=request.data, partial=True)
        form.is_valid(raise_exception=True)
        toolsets.toolset_update(toolset=toolset, actor=request.user, **form.validated_data)
        return Response(self.shown(toolset_id))

    @extend_schema(responses={204: None})
    def delete(self, request: Request, toolset_id: Any) -> Response:
        toolset = self.get_toolset(toolset_id)
        self.require_admin(toolset)
        toolsets.toolset_delete(toolset=toolset, actor=request.user)
        return Response(status=status.HTTP_204_NO_CONTENT)


PROXY_DESCRIPTION = (
    "MCP Streamable HTTP endpoint of one external server, for agents. Authenticate with "
    "`Authorization: Bearer tmcp_…`. POST carries JSON-RPC messages (answers are JSON or an SSE stream), "
    "GET opens the server-to-client SSE stream, DELETE ends a session. Free-plan users get "
    "EXTERNAL_MCP_FREE_DAILY_LIMIT tools/call per UTC day; beyond that: HTTP 429 with RateLimit headers and "
    "a JSON-RPC error whose data is {limit, remaining, reset_at, plan, upgrade_url}. Served by the ASGI "
    "gateway in external_mcp/gateway/."
)


class ProxyEndpoint(APIView):
    """Documents the proxy path. Under uvicorn the ASGI router answers this path before Django;
    this view only answers when Django is served without it (WSGI), and says so."""

    authentication_classes: list = []
    permission_classes: list = []

    def _not_here(self) -> Response:
        return Response({"detail": "The MCP proxy is served by the ASGI application (uvicorn twinmcp.asgi)."},
                        status=status.HTTP_503_SERVICE_UNAVAILABLE)

    @extend_schema(description=PROXY_DESCRIPTION, request={"application/json": dict},
                   responses={200: dict, 202: None, 401: dict, 404: dict, 429: dict, 502: dict, 504: dict},
                   tags=["mcp proxy"])
    def post(self, request: Request, server_id: Any) -> Response:
        return self._not_here()

    @extend_schema(description=PROXY_DESCRIPTION, responses={200: str}, tags=["mcp proxy"])
    def get(self, request: Request, server_id: Any) -> Response:
        return self._not_here()

    @extend_schema(description=PROXY_DESCRIPTION, responses={200: None, 204: None}, tags=["mcp proxy"])
    def delete(self, request: Request, server_id: Any) -> Response:
        return self._not_here()
