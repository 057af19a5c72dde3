"""The per-request pipeline every gateway endpoint runs: check, take the quota, forward, relay,
and settle on one exit path.

``settle`` runs whatever happened: the usage events are recorded (one per JSON-RPC message,
committed before the answer's last byte), uses the agent got no answer for are refunded, the
request is counted and logged, and what is left of the answer is sent.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from typing import Any

from django.conf import settings
from django.utils import timezone

from external_mcp import metrics
from external_mcp.gateway import bridge, inbound, quota, relay
from external_mcp.gateway.call import Call, Receive, Scope, Send
from external_mcp.gateway.errors import ProxyError, client_disconnected
from external_mcp.jsonrpc import dumps, error_body, error_response, id_key, is_request
from twinmcp.ids import random_hex
from usage.events import Sent, proxied_rows, storable_text
from usage.models import Outcome
from usage.recorder import get_recorder

logger = logging.getLogger("external_mcp.proxy")

REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
_METRIC_METHODS = {"tools/call", "tools/list", "initialize", "server/discover", "notifications/initialized",
                   "resources/read", "resources/list", "resources/templates/list", "prompts/get", "prompts/list",
                   "completion/complete", "subscriptions/listen", "ping", "GET", "DELETE", "POST"}


class Pipeline:
    """A gateway endpoint as a raw ASGI app: ``handle`` carries the request as far as it goes, and
    whatever happened, ``settle`` ends it."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = dict(scope["headers"])
        incoming_id = headers.get(b"x-request-id", b"").decode("latin-1")
        call = Call(method=scope["method"],
                    request_id=incoming_id if REQUEST_ID_RE.fullmatch(incoming_id) else random_hex(),
                    stages={} if settings.EXTERNAL_MCP_STAGE_TIMERS else None)
        try:
            await self.handle(call, scope, headers, receive, send)
        except ProxyError as exc:
            call.failure = exc
        except asyncio.CancelledError:
            call.failure = client_disconnected("Cancelled.")
            await settle(call, send)
            raise
        except Exception as exc:  # noqa: BLE001 - whatever failed, the request is still settled and recorded
            logger.exception("proxy failure", extra={"event": "proxy_failure", "request_id": call.request_id})
            call.failure = ProxyError(500, -32603, "TwinMCP could not relay this request; the failure is logged "
                                      f"under request id {call.request_id}.", error_class="internal",
                                      detail=f"{type(exc).__name__}: {exc}")
        await settle(call, send)

    async def handle(self, call: Call, scope: Scope, headers: dict[bytes, bytes], receive: Receive,
                     send: Send) -> None:
        raise NotImplementedError


class McpProxy(Pipeline):
    """``/api/v1/external-mcp/<server_id>/mcp``: one server, the agent's messages as they are."""

    async def handle(self, call: Call, scope: Scope, headers: dict[bytes, bytes], receive: Receive,
                     send: Send) -> None:
        inbound.check_host(headers)
        server_id = inbound.server_id_of(scope["path"])
        inbound.check_method(call.method)
        key = call.key = await inbound.authenticate(headers)
        server = await inbound.load_server(call, server_id, key)
        call.lap("auth")
        if call.method == "POST":
            await inbound.read_messages(call, receive)
            inbound.govern(call, server, headers)
            call.lap("request")
        extra = await quota.take(call, key)
        response = await bridge.forward(call, headers)
        async with response:
            await relay.answer(call, response, receive, send, extra)
        call.lap("relay")


async def settle(call: Call, send: Send) -> None:
    """The one exit: refund what the agent got no answer for, record the usage events, count
    and log the request, then send what is left: the last byte goes after all of that."""
    exc = call.failure
    if exc is not None:
        await fail(call, exc)
    try:
        await record(call)
    except Exception:  # noqa: BLE001 - e.g. a pluggable token counter; the answer still goes out
        logger.exception("usage events not recorded", extra={"event": "proxy_failure", "request_id": call.request_id})
    call.lap("record")
    observe(call)  # before the last byte: an agent that has its answer finds the request logged and counted
    if exc is None or exc.status != 499:
        if not call.response_started:
            headers = [*call.reply_headers, (b"content-length", str(len(call.reply)).encode())]
            await send({"type": "http.response.start", "status": call.status, "headers": headers})
        await send({"type": "http.response.body", "body": call.reply, "more_body": False})


async def fail(call: Call, exc: ProxyError) -> None:
    call.outcome = exc.outcome
    call.error_code = exc.code
    if exc.error_class and call.server is not None:
        metrics.ERRORS.labels(call.server_label, "proxy", exc.error_class).inc()
    if exc.outcome != Outcome.CLIENT_DISCONNECT:
        await quota.refund(call, keep_delivered=True)
    if call.streaming:
        ids = call.screen.unanswered if call.screen is not None else []
        call.reply = b"".join(b"data: " + error_body(i, exc.code, exc.message) + b"\n\n" for i in ids)
        return
    call.status = exc.status
    call.reply_headers = [(b"content-type", b"application/json"), (b"x-request-id", call.request_id.encode()),
                          *exc.headers]
    ids = [m["id"] for m in call.messages if is_request(m)]
    if call.batch and ids:
        call.reply = dumps([error_response(i, exc.code, exc.message, exc.data) for i in ids])
    else:
        request_id = call.messages[0].get("id") if len(call.messages) == 1 else None
        call.reply = error_body(request_id, exc.code, exc.message, exc.data)


async def record(call: Call) -> None:
    """One usage event per JSON-RPC message (or one for a GET/DELETE), committed before the
    answer's last byte. Nothing is recorded for a server outside the caller's workspace."""
    key, server = call.key, call.server
    if key is None or server is None:
        return
    call.latency_ms = round((time.perf_counter() - call.started) * 1000, 3)
    base = {
        "created_at": timezone.now(), "user_id": key.user_id, "workspace_id": key.workspace_id,
        "server_id": server.id, "api_key_id": key.key_id, "request_id": call.request_id,
        "latency_ms": call.latency_ms, "upstream_status": call.upstream_status,
        "endpoint": call.endpoint, "toolset_id": call.toolset_id,
    }
    rows = proxied_rows(base=base, sent=_sent(call), outcome=call.outcome, error_code=call.error_code,
                        status=call.status, bytes_out=call.bytes_out)
    recorder = get_recorder()
    if len(rows) == 1:
        await recorder.record(rows[0])
    else:  # handed over together, so they share one commit
        await asyncio.gather(*(recorder.record(row) for row in rows))


def _sent(call: Call) -> list[Sent]:
    if not call.messages:
        return [Sent(method=call.method, tool="", jsonrpc_id="", raw=call.body, counted=False, reply=None)]
    replies = call.delivered
    sent: list[Sent] = []
    for index, message in enumerate(call.messages):
        method = message.get("method", call.method)
        params = message.get("params") if isinstance(message.get("params"), dict) else {}
        sent.append(Sent(
            method=method, tool=(params.get("name") if method == "tools/call" else "") or "",
            jsonrpc_id=_id_text(message), raw=call.body if len(call.messages) == 1 else dumps(message),
            counted=quota.counted(call, index), reply=replies.get(id_key(message["id"])) if "id" in message else None,
        ))
    return sent


def _id_text(message: dict[str, Any]) -> str:
    if "id" not in message:
        return ""
    value = message["id"]
    return value if isinstance(value, str) else dumps(value).decode()


def observe(call: Call) -> None:
    """The request's metrics and its one log line."""
    label = call.server_label
    latency = call.latency_ms if call.latency_ms is not None else (time.perf_counter() - call.started) * 1000
    method = call.messages[0].get("method", call.method) if len(call.messages) == 1 else call.method
    metrics.REQUESTS.labels(label, method if method in _METRIC_METHODS else "other", call.outcome).inc()
    metrics.LATENCY.labels(label, "proxy").observe(latency / 1000)
    if logger.isEnabledFor(logging.INFO):
        tool = ""
        if method == "tools/call" and isinstance(call.messages[0].get("params"), dict):
            tool = storable_text(call.messages[0]["params"].get("name", ""), 200)
        logger.info("proxied request", extra={
            "event": "proxy_request", "request_id": call.request_id,
            "server": str(call.server.id) if call.server is not None else "",
            "workspace": str(call.key.workspace_id) if call.key else "",
            "user": call.key.user_id if call.key else None, "method": method, "tool": tool,
            "endpoint": call.endpoint, "outcome": call.outcome, "status": call.status,
            "latency_ms": round(latency, 2), "detail": call.failure.detail if call.failure is not None else "",
            "stages": call.stages})
