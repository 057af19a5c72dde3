"""DRF authentication with TwinMCP API keys (``Authorization: Bearer tmcp_…``)."""

from __future__ import annotations

from typing import Any

from drf_spectacular.extensions import OpenApiAuthenticationExtension
from rest_framework import authentication, exceptions
from rest_framework.request import Request

from twinmcp.apikeys import ApiKeyError, parse_authorization, resolve_key
from twinmcp.models import ApiKey


class ApiKeyAuthentication(authentication.BaseAuthentication):
    """Claims every ``Bearer`` header: a bad one is a 401, never a fall-through to sessions."""

    keyword = "Bearer"

    def authenticate(self, request: Request) -> tuple[Any, ApiKey] | None:
        header = request.META.get("HTTP_AUTHORIZATION")
        if not header:
            return None
        try:
            key = resolve_key(parse_authorization(header))
        except ApiKeyError as exc:
            raise exceptions.AuthenticationFailed(str(exc)) from None
        return key.user, key

    def authenticate_header(self, request: Request) -> str:
        return 'Bearer realm="twinmcp"'


class ApiKeyScheme(OpenApiAuthenticationExtension):
    target_class = "twinmcp.authentication.ApiKeyAuthentication"
    name = "TwinMCPApiKey"

    def get_security_definition(self, auto_schema: Any) -> dict[str, str]:
        return {"type": "http", "scheme": "bearer", "bearerFormat": "tmcp_…"}
