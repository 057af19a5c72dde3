"""Content-Security-Policy on every response: the UI loads only its own assets (vendored htmx and
Chart.js, static/js/*.js, static/css/*.css), with no inline script or style and no eval.

``TWINMCP_CSP`` is the policy; ``TWINMCP_CSP_PATH_OVERRIDES`` maps a path prefix to another policy
(an empty string sends none), for third-party pages that need inline code (Swagger UI's bootstrap).
A response that already carries a policy keeps it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from asgiref.sync import iscoroutinefunction
from django.conf import settings
from django.http import HttpRequest, HttpResponseBase
from django.utils.decorators import sync_and_async_middleware

HEADER = "Content-Security-Policy"

DEFAULT_POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; font-src 'self'; "
    "connect-src 'self'; object-src 'none'; base-uri 'self'; form-action 'self'; frame-ancestors 'none'"
)


def policy_for(path: str) -> str:
    overrides: dict[str, str] = getattr(settings, "TWINMCP_CSP_PATH_OVERRIDES", {})
    for prefix, policy in overrides.items():
        if path.startswith(prefix):
            return policy
    return getattr(settings, "TWINMCP_CSP", DEFAULT_POLICY)


def _apply(request: HttpRequest, response: HttpResponseBase) -> HttpResponseBase:
    if HEADER not in response:
        policy = policy_for(request.path)
        if policy:
            response[HEADER] = policy
    return response


@sync_and_async_middleware
def ContentSecurityPolicyMiddleware(get_response: Callable[[HttpRequest], Any]) -> Callable[[HttpRequest], Any]:  # noqa: N802
    if iscoroutinefunction(get_response):

        async def middleware(request: HttpRequest) -> HttpResponseBase:
            response = await get_response(request)
            return _apply(request, response)

    else:

        def middleware(request: HttpRequest) -> HttpResponseBase:  # type: ignore[misc]
            return _apply(request, get_response(request))

    return middleware

