"""REST API for TwinMCP API keys."""

from __future__ import annotations

from typing import Any

from drf_spectacular.utils import extend_schema
from rest_framework import status
from rest_framework.generics import get_object_or_404
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from twinmcp import services
from twinmcp.models import ApiKey
from twinmcp.scoping import resolve_workspace
from twinmcp.serializers import ApiKeyCreatedSerializer, ApiKeyCreateSerializer, ApiKeySerializer


class ApiKeyListCreate(APIView):
    @extend_schema(responses=ApiKeySerializer(many=True))
    def get(self, request: Request) -> Response:
        keys = ApiKey.objects.filter(user=request.user).select_related("workspace")
        return Response(ApiKeySerializer(keys, many=True).data)

    @extend_schema(request=ApiKeyCreateSerializer, responses={201: ApiKeyCreatedSerializer})
    def post(self, request: Request) -> Response:
        form = ApiKeyCreateSerializer(data=request.data)
        form.is_valid(raise_exception=True)
        workspace = resolve_workspace(request, form.validated_data.get("workspace"))
        key, raw = services.api_key_create(
            user=request.user,
            workspace=workspace,
            name=form.validated_data["name"],
            expires_at=form.validated_data.get("expires_at"),
        )
        key.key = raw  # type: ignore[attr-defined]
        return Response(ApiKeyCreatedSerializer(key).data, status=status.HTTP_201_CREATED)


class ApiKeyRevoke(APIView):
    @extend_schema(responses={204: None})
    def delete(self, request: Request, key_id: Any) -> Response:
        key = get_object_or_404(ApiKey, pk=key_id, user=request.user)
        services.api_key_revoke(key=key)
        return Response(status=status.HTTP_204_NO_CONTENT)
