"""REST API of the server registry. Thin: permissions and shapes here, rules in services."""

from __future__ import annotations

from typing import Any

from django.db.models import QuerySet
from django.http import Http404
from drf_spectacular.utils import OpenApiParameter, extend_schema
from rest_framework import status
from rest_framework.exceptions import PermissionDenied
from rest_framework.pagination import LimitOffsetPagination
from rest_framework.permissions import IsAuthenticated
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from external_mcp import services
from external_mcp.choices import ServerStatus
from external_mcp.models import ExternalMcpServer
from external_mcp.serializers import (
    CredentialsRotateSerializer,
    ServerFilterSerializer,
    ServerSerializer,
    ServerUpdateSerializer,
    ServerWriteSerializer,
)
from twinmcp.flags import ExternalMcpEnabled
from twinmcp.models import Membership, Role
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

    def require_admin(self, server: ExternalMcpServer) -> None:
        if not Membership.objects.filter(
            user=self.request.user, workspace_id=server.workspace_id, role=Role.ADMIN
        ).exists():
            raise PermissionDenied("Only workspace admins can change servers.")


class ServerListCreate(ExternalMcpView):
    @extend_schema(
        parameters=[
            OpenApiParameter("status", str, enum=ServerStatus.values),
            OpenApiParameter("tag", str),
            OpenApiParameter("search", str),
            OpenApiParameter("limit", int),
            OpenApiParameter("offset", int),
        ],
        responses=ServerSerializer(many=True),
    )
    def get(self, request: Request) -> Response:
        filters = ServerFilterSerializer(data=request.query_params)
        filters.is_valid(raise_exception=True)
        servers = self.servers()
        if status_ := filters.validated_data.get("status"):
            servers = servers.filter(status=status_)
        if tag := filters.validated_data.get("tag"):
            servers = servers.with_tag(tag)
        if text := filters.validated_data.get("search"):
            servers = servers.search(text)
        paginator = LimitOffsetPagination()
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
