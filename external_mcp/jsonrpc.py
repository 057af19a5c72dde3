"""JSON-RPC as the proxy meets it: parse what an agent or an upstream sent (strict JSON, bounded
depth), tell requests from responses, key ids of any type, and build errors."""

from __future__ import annotations

import json
from typing import Any

from twinmcp.parsers import JsonTooDeep, check_depth


class InvalidMessage(ValueError):
    """Valid JSON that is not a JSON-RPC message the proxy can forward."""


def parse_json(data: bytes) -> Any:
    """Strict JSON (no NaN or Infinity) nested at most ``twinmcp.parsers.MAX_JSON_DEPTH`` levels. Raises ValueError
    with a message naming the problem."""
    try:
        value = _DECODER.decode(data.decode("utf-8"))
    except RecursionError:
        raise JsonTooDeep() from None
    except ValueError:
        raise ValueError("not valid JSON") from None
    return check_depth(data, value)


def _refuse_constant(name: str) -> Any:
    raise ValueError(name)


# Built once: ``json.loads``/``json.dumps`` with any option build a new decoder/encoder per call.
_DECODER = json.JSONDecoder(parse_constant=_refuse_constant)
_ENCODER = json.JSONEncoder(separators=(",", ":"))


def dumps(value: Any) -> bytes:
    """Compact JSON, ASCII only: a lone surrogate an upstream sent escaped stays escaped."""
    return _ENCODER.encode(value).encode()


def messages_of(body: bytes) -> tuple[list[dict[str, Any]], bool]:
    """The JSON-RPC messages of an agent's POST body, and whether it was a batch. Raises
    ValueError when the body is not JSON, InvalidMessage when it is not JSON-RPC."""
    data = parse_json(body)
    items = data if isinstance(data, list) else [data]
    if not items or not all(isinstance(m, dict) for m in items):
        raise InvalidMessage("expected a JSON-RPC message object or a non-empty array of them")
    if not all(isinstance(m["method"], str) for m in items if "method" in m):
        raise InvalidMessage("a JSON-RPC method must be a string")
    return items, isinstance(data, list)


def is_request(message: dict[str, Any]) -> bool:
    """A request expects a response: it has a method and an id (of whatever type)."""
    return "method" in message and "id" in message


def is_response(message: Any) -> bool:
    """A well-formed JSON-RPC response: an id and either a result or an error object with an
    integer code, never both."""
    if not isinstance(message, dict) or "id" not in message or "method" in message:
        return False
    if "error" in message:
        return "result" not in message and error_code(message) is not None
    return "result" in message


def error_code(message: dict[str, Any]) -> int | None:
    error = message.get("error")
    code = error.get("code") if isinstance(error, dict) else None
    return code if isinstance(code, int) and not isinstance(code, bool) else None


def id_key(value: Any) -> str:
    """A hashable key for a JSON-RPC id of any type: ``1`` and ``1.0`` are one id (a JavaScript
    peer answers the one with the other), ``1`` and ``"1"`` and ``true`` are three."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, dict | list):
        return json.dumps(value, sort_keys=True, separators=(",", ":"))
    return json.dumps(value)


def error_response(request_id: Any, code: int, message: str, data: dict[str, Any] | None = None) -> dict[str, Any]:
    error: dict[str, Any] = {"code": code, "message": message}
    if data is not None:
        error["data"] = data
    return {"jsonrpc": "2.0", "id": request_id, "error": error}


def error_body(request_id: Any, code: int, message: str, data: dict[str, Any] | None = None) -> bytes:
    return dumps(error_response(request_id, code, message, data))
