"""Every API error is JSON that names the problem; unexpected errors never leak details.

Two layers: ``exception_handler`` shapes what DRF views raise, and the Django error handlers
(``handler400/403/404/500``, named in ``twinmcp/urls.py``) answer what happens before or around a
DRF view — an unknown URL or a malformed id under ``/api/``, a body over
``DATA_UPLOAD_MAX_MEMORY_SIZE`` found by a middleware, an unhandled exception — with the same
``{"detail": …}`` JSON under ``/api/`` and Django's HTML pages everywhere else.
"""

from __future__ import annotations

import logging
from typing import Any

from django.conf import settings
from django.core.exceptions import RequestDataTooBig, TooManyFieldsSent, TooManyFilesSent
from django.core.exceptions import ValidationError as DjangoValidationError
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.views import defaults
from rest_framework import exceptions, status
from rest_framework.response import Response
from rest_framework.views import exception_handler as drf_exception_handler

from twinmcp.parsers import RequestTooLarge

logger = logging.getLogger(__name__)

API_PREFIX = "/api/"


class Conflict(exceptions.APIException):
    status_code = status.HTTP_409_CONFLICT
    default_detail = "Conflict."
    default_code = "conflict"


class LimitReached(Exception):
    """A service refused a write because a limit is reached; the API answers 409."""


def upload_limit_error(exc: BaseException) -> exceptions.APIException | None:
    """The API's answer to Django's own upload limits (raised while reading a body), if it is one."""
    if isinstance(exc, RequestDataTooBig):
        return RequestTooLarge()
    if isinstance(exc, TooManyFieldsSent):
        limit = settings.DATA_UPLOAD_MAX_NUMBER_FIELDS
        return exceptions.ParseError(f"The request has more fields than DATA_UPLOAD_MAX_NUMBER_FIELDS ({limit}).")
    if isinstance(exc, TooManyFilesSent):
        limit = settings.DATA_UPLOAD_MAX_NUMBER_FILES
        return exceptions.ParseError(f"The request has more files than DATA_UPLOAD_MAX_NUMBER_FILES ({limit}).")
    return None


def exception_handler(exc: Exception, context: dict[str, Any]) -> Response | None:
    if isinstance(exc, DjangoValidationError):
        detail = exc.message_dict if hasattr(exc, "error_dict") else {"non_field_errors": exc.messages}
        exc = exceptions.ValidationError(detail)
    if isinstance(exc, LimitReached):
        exc = Conflict(str(exc))
    exc = upload_limit_error(exc) or exc
    response = drf_exception_handler(exc, context)
    if response is not None:
        if isinstance(response.data, list):
            response.data = {"non_field_errors": response.data}
        elif isinstance(response.data, dict):
            response.data = {
                key: [value] if key != "detail" and isinstance(value, str) else value
                for key, value in response.data.items()
            }
    return response


# -- Django's error handlers ---------------------------------------------------------------------------


def is_api(request: HttpRequest) -> bool:
    return request.path.startswith(API_PREFIX)


def _json(detail: str, status_code: int) -> JsonResponse:
    return JsonResponse({"detail": detail}, status=status_code)


def handler400(request: HttpRequest, exception: Exception) -> HttpResponse:
    if not is_api(request):
        return defaults.bad_request(request, exception)
    known = upload_limit_error(exception)
    if known is not None:
        return _json(str(known.detail), known.status_code)
    return _json("Bad request: the request could not be read (check its headers, encoding and body).", 400)


def handler403(request: HttpRequest, exception: Exception) -> HttpResponse:
    if not is_api(request):
        return defaults.permission_denied(request, exception)
    return _json("You do not have permission to perform this action.", 403)


def handler404(request: HttpRequest, exception: Exception) -> HttpResponse:
    if not is_api(request):
        return defaults.page_not_found(request, exception)
    return _json("Not found: no API endpoint or object at this URL (ids are UUIDs).", 404)


def handler500(request: HttpRequest) -> HttpResponse:
    if not is_api(request):
        return defaults.server_error(request)
    request_id = getattr(request, "request_id", "")
    hint = f" (request id {request_id})" if request_id else ""
    return _json(f"Internal server error{hint}; it has been logged.", 500)
