"""Every API error is JSON that names the field; unexpected errors never leak details."""

from __future__ import annotations

import logging
from typing import Any

from django.core.exceptions import ValidationError as DjangoValidationError
from rest_framework import exceptions, status
from rest_framework.response import Response
from rest_framework.views import exception_handler as drf_exception_handler

logger = logging.getLogger(__name__)


class Conflict(exceptions.APIException):
    status_code = status.HTTP_409_CONFLICT
    default_detail = "Conflict."
    default_code = "conflict"


class LimitReached(Exception):
    """A service refused a write because a limit is reached; the API answers 409."""


def exception_handler(exc: Exception, context: dict[str, Any]) -> Response | None:
    if isinstance(exc, DjangoValidationError):
        detail = exc.message_dict if hasattr(exc, "error_dict") else {"non_field_errors": exc.messages}
        exc = exceptions.ValidationError(detail)
    if isinstance(exc, LimitReached):
        exc = Conflict(str(exc))
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
