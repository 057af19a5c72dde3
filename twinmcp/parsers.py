"""Request bodies are hostile input: every JSON the API decodes goes through ``loads``, which
refuses documents nested deeper than ``MAX_JSON_DEPTH`` (Python's decoder would otherwise raise
``RecursionError`` at about a thousand levels, and everything that walks the value later — the
serializers, the database adapter, hashing — recurses as well), and the DRF parsers read at most
``DATA_UPLOAD_MAX_MEMORY_SIZE`` bytes, as Django does for its own forms.

DRF's stock parsers read the stream whole, past Django's limit; these are configured in
``REST_FRAMEWORK`` (settings.py), and ``BoundedJSONField`` applies the same depth rule to JSON
sent as a form field.
"""

from __future__ import annotations

import json
from typing import IO, Any

from django.conf import settings
from django.http import QueryDict
from rest_framework import parsers, serializers, status
from rest_framework.exceptions import APIException, ParseError
from rest_framework.utils.json import strict_constant

MAX_JSON_DEPTH = 128
"""How deeply JSON from outside may nest (objects and arrays): API bodies, and an agent's or an
upstream's MCP messages in the proxy. Far below what the interpreter's recursion limit allows
wherever the document is walked again, far above any real message (serde_json's default)."""


class RequestTooLarge(APIException):
    status_code = status.HTTP_413_REQUEST_ENTITY_TOO_LARGE
    default_code = "request_too_large"

    def __init__(self) -> None:
        super().__init__(f"The request body is larger than DATA_UPLOAD_MAX_MEMORY_SIZE "
                         f"({settings.DATA_UPLOAD_MAX_MEMORY_SIZE} bytes).")


class JsonTooDeep(ValueError):
    """A JSON document nested deeper than the limit."""

    def __init__(self, max_depth: int = MAX_JSON_DEPTH) -> None:
        super().__init__(f"JSON nested deeper than {max_depth} levels of arrays and objects.")


def _deeper_than(value: Any, max_depth: int) -> bool:
    """Iterative, so a value Python could build is never walked with the C stack."""
    pending: list[tuple[Any, int]] = [(value, 1)]
    while pending:
        item, depth = pending.pop()
        children = item.values() if isinstance(item, dict) else item
        if depth > max_depth:
            return True
        pending.extend((child, depth + 1) for child in children if isinstance(child, dict | list))
    return False


def check_depth(raw: str | bytes, value: Any, *, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """``value``, decoded from ``raw``, unless it nests deeper than ``max_depth`` (``JsonTooDeep``).
    A document cannot nest deeper than it has brackets: counting them (C speed) spares the walk
    for almost every document."""
    brackets = raw.count(b"[") + raw.count(b"{") if isinstance(raw, bytes) else raw.count("[") + raw.count("{")
    if brackets > max_depth and isinstance(value, dict | list) and _deeper_than(value, max_depth):
        raise JsonTooDeep(max_depth)
    return value


def loads(text: str | bytes, *, max_depth: int = MAX_JSON_DEPTH, **kwargs: Any) -> Any:
    """``json.loads`` that raises ``JsonTooDeep`` (a ``ValueError``) past ``max_depth`` levels."""
    try:
        value = json.loads(text, **kwargs)
    except RecursionError:
        raise JsonTooDeep(max_depth) from None
    return check_depth(text, value, max_depth=max_depth)


def read_bounded(stream: IO[bytes] | None) -> bytes:
    """The body, or ``RequestTooLarge`` once it passes ``DATA_UPLOAD_MAX_MEMORY_SIZE``."""
    if stream is None:
        return b""
    limit = settings.DATA_UPLOAD_MAX_MEMORY_SIZE
    if limit is None:
        return stream.read()
    raw = stream.read(limit + 1)
    if len(raw) > limit:
        raise RequestTooLarge()
    return raw


class BoundedJSONParser(parsers.JSONParser):
    def parse(self, stream: IO[bytes], media_type: str | None = None,
              parser_context: dict[str, Any] | None = None) -> Any:
        encoding = parsers.get_encoding(parser_context or {})
        raw = read_bounded(stream)
        try:
            text = raw.decode(encoding)
        except UnicodeDecodeError:
            raise ParseError(f"JSON parse error - the body is not valid {encoding}.") from None
        try:
            return loads(text, parse_constant=strict_constant if self.strict else None)
        except ValueError as exc:
            raise ParseError(f"JSON parse error - {exc}") from None


class BoundedFormParser(parsers.FormParser):
    def parse(self, stream: IO[bytes], media_type: str | None = None,
              parser_context: dict[str, Any] | None = None) -> QueryDict:
        encoding = parsers.get_encoding(parser_context or {})
        return QueryDict(read_bounded(stream), encoding=encoding)


class BoundedJSONField(serializers.JSONField):
    """A JSON value; when it arrives as text (a form field), decoded with the depth limit."""

    def to_internal_value(self, data: Any) -> Any:
        if isinstance(data, str | bytes) and (self.binary or getattr(data, "is_json_string", False)):
            try:
                return loads(data)
            except JsonTooDeep as exc:
                raise serializers.ValidationError(str(exc)) from None
            except ValueError:
                self.fail("invalid")
        return super().to_internal_value(data)
