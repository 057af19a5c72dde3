"""Integers in query strings are hostile input: each has a range, and a value outside it (or not
a whole number) is a 400 naming the parameter — never a silent default, and never a number that
reaches PostgreSQL as ``bigint out of range``."""

from __future__ import annotations

import re

from drf_spectacular.utils import OpenApiParameter
from rest_framework.exceptions import ValidationError
from rest_framework.pagination import LimitOffsetPagination
from rest_framework.request import Request

MAX_LIMIT = 1000
MAX_OFFSET = 2**31 - 1

_WHOLE_NUMBER = re.compile(r"[0-9]{1,10}")


def query_integer(request: Request, name: str, *, default: int, minimum: int, maximum: int) -> int:
    """The whole number ``name`` in the query string, ``default`` when absent or empty."""
    raw = request.query_params.get(name)
    if raw is None or raw == "":
        return default
    if _WHOLE_NUMBER.fullmatch(raw) is None or not minimum <= int(raw) <= maximum:
        raise ValidationError({name: [f"A whole number from {minimum} to {maximum}."]})
    return int(raw)


class BoundedLimitOffsetPagination(LimitOffsetPagination):
    """``limit`` from 1 to ``MAX_LIMIT`` (default: ``PAGE_SIZE``), ``offset`` from 0 to ``MAX_OFFSET``."""

    max_limit = MAX_LIMIT

    def get_limit(self, request: Request) -> int:
        return query_integer(request, self.limit_query_param, default=self.default_limit or MAX_LIMIT,
                             minimum=1, maximum=self.max_limit or MAX_LIMIT)

    def get_offset(self, request: Request) -> int:
        return query_integer(request, self.offset_query_param, default=0, minimum=0, maximum=MAX_OFFSET)


# The same ranges in the OpenAPI schema of the views that paginate by hand.
PAGINATION_PARAMETERS = [
    OpenApiParameter("limit", {"type": "integer", "minimum": 1, "maximum": MAX_LIMIT},
                     description=f"Rows per page, 1 to {MAX_LIMIT} (default 50)."),
    OpenApiParameter("offset", {"type": "integer", "minimum": 0, "maximum": MAX_OFFSET},
                     description=f"Rows to skip, 0 to {MAX_OFFSET}."),
]
