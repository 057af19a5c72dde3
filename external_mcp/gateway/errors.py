"""How a proxied request ends when it cannot end well: one exception, one JSON-RPC code each."""

from __future__ import annotations

import uuid
from typing import Any

from django.conf import settings
from mcp_types import URL_ELICITATION_REQUIRED

from external_mcp.oauth.grants import connect_url
from external_mcp.proxy_cache import ServerInfo
from usage.models import Outcome


class ProxyError(Exception):
    """Ends a request with a JSON-RPC error. ``message`` is for the agent (never an internal
    address); ``detail`` goes to the log line only."""

    def __init__(self, status: int, code: int, message: str, *, outcome: str = Outcome.ERROR,
                 error_class: str = "", headers: list[tuple[bytes, bytes]] | None = None,
                 data: dict[str, Any] | None = None, detail: str = "") -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message
        self.outcome, self.error_class, self.detail = outcome, error_class, detail
        self.headers = headers or []
        self.data = data


def upstream_error(server: ServerInfo, status: int, code: int, what: str, error_class: str, *,
                   outcome: str = Outcome.UPSTREAM_ERROR, detail: str = "") -> ProxyError:
    return ProxyError(status, code, f"{server.name}: {what}", outcome=outcome, error_class=error_class,
                      detail=detail)


def credentials_refused(server: ServerInfo, status: int) -> ProxyError:
    return upstream_error(server, 502, -32016, f"the upstream refused TwinMCP's stored credentials (HTTP {status}); "
                          "a workspace admin must rotate them.", "auth")


def timed_out(server: ServerInfo, seconds: float) -> ProxyError:
    return upstream_error(server, 504, -32014, f"the upstream did not answer within {seconds:g} s.", "timeout",
                          outcome=Outcome.TIMEOUT)


def truncated(server: ServerInfo, exc: BaseException) -> ProxyError:
    return upstream_error(server, 502, -32019, "the upstream closed the connection before its answer was complete.",
                          "truncated", detail=str(exc))


def too_large(server: ServerInfo) -> ProxyError:
    cap = settings.EXTERNAL_MCP_MAX_RESPONSE_BYTES
    return upstream_error(server, 502, -32021, f"the upstream's answer is larger than {cap} bytes.", "too_large")


def invalid_answer(server: ServerInfo, reason: str) -> ProxyError:
    return upstream_error(server, 502, -32022, f"the upstream's answer {reason}.", "invalid_answer")


def unanswered(server: ServerInfo, problem: str) -> ProxyError:
    detail = f" ({problem})" if problem else ""
    return upstream_error(server, 502, -32023,
                          f"the upstream's event stream ended without a response to this request{detail}.",
                          "unanswered")


def connection_failed(server: ServerInfo, exc: BaseException) -> ProxyError:
    return upstream_error(server, 502, -32015, f"the upstream connection failed ({type(exc).__name__}).", "connect",
                          detail=str(exc))


def client_disconnected(message: str = "Client disconnected.") -> ProxyError:
    return ProxyError(499, -32000, message, outcome=Outcome.CLIENT_DISCONNECT)


def connection_needed(server: ServerInfo, exc: BaseException | str) -> ProxyError:
    """No account to call ``server`` with: the message says where to connect one, and agents that
    support URL-mode elicitation (2025-11-25) get that page as an elicitation to open."""
    message = str(exc)
    url = getattr(exc, "url", "") or connect_url(server.id)
    elicitation = {"mode": "url", "message": message, "url": url, "elicitationId": f"twinmcp-connect-{uuid.uuid4()}"}
    return ProxyError(403, URL_ELICITATION_REQUIRED, message, outcome=Outcome.UPSTREAM_ERROR,
                      error_class="needs_connection", data={"elicitations": [elicitation]})
