"""A tool call made from the server page, run through the gateway's own pipeline as the signed-in user.

The playground is one more gateway endpoint: a ``Pipeline`` whose caller is identified in process
(the user's session, no API key) instead of by a bearer key. Everything after that is the agents'
path, step for step: the server as that user sees it (their own connection for per-user
credentials, the feature flag), governance, the daily quota, the upstream session TwinMCP opens
itself (as the aggregate endpoints do), the screened relay, and ``settle``, which records the
usage event (no API key, request id ``playground-…``). Calling the ASGI gateway over HTTP instead
would need a key the user never created; calling the upstream directly would skip all of it.

What the pipeline sends is read back here as the agent would read it: progress and other
notifications as they arrive, then the response to our request. All of it came from an upstream:
``shown_result`` turns a result into plain values the template escapes, within size caps.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import re
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from mcp_types import URL_ELICITATION_REQUIRED

from external_mcp import sse
from external_mcp.gateway import inbound, quota, relay
from external_mcp.gateway.call import Call, Receive, Scope, Send
from external_mcp.gateway.pipeline import Pipeline
from external_mcp.gateway.sessions import Record
from external_mcp.gateway.upstream import LATEST_HANDSHAKE, Agent, close_session, connect
from external_mcp.jsonrpc import dumps, parse_json
from external_mcp.proxy_cache import KeyInfo
from external_mcp.served_catalog import Member
from external_mcp.storable import display_text
from twinmcp.services import profile_ensure

REQUEST_PREFIX = "playground-"
"""How the playground's usage events are told apart from an agent's: their request id starts so."""
IDENTITY = "twinmcp.playground.identity"
SERVER = "twinmcp.playground.server"
CALL_ID = 1
QUOTA_CODE = -32029
MAX_BLOCKS = 50
MAX_TEXT = 100_000
MAX_NOTICE = 500
MAX_JSON_SHOWN = 200_000
IMAGE_TYPE_RE = re.compile(r"^image/[a-z0-9][a-z0-9.+-]{0,80}$")


def identity_for(*, user: Any, workspace_id: Any) -> KeyInfo:
    """The signed-in user as the gateway knows a caller: their plan's quota, in the server's workspace."""
    plan = profile_ensure(user=user).plan
    return KeyInfo(key_id=None, user_id=user.pk, username=user.get_username(), workspace_id=workspace_id,
                   expires_at=None, plan=plan.code, daily_limit=plan.effective_daily_limit)


class PlaygroundEndpoint(Pipeline):
    """The per-server pipeline for a caller identified in process (see the module docstring)."""

    async def handle(self, call: Call, scope: Scope, headers: dict[bytes, bytes], receive: Receive,
                     send: Send) -> None:
        key = call.key = scope[IDENTITY]
        server = await inbound.load_server(call, scope[SERVER], key)
        await inbound.read_messages(call, receive)
        inbound.govern(call, server, {})
        extra = await quota.take(call, key)
        # A handshake-era client of its own, as the aggregate endpoints are for a handshake agent:
        # the session is opened for this call, kept nowhere, and closed after it.
        member = Member(id=server.id, prefix="", name=server.name, era="handshake", capabilities={}, serving=True)
        agent = Agent(False, f"{REQUEST_PREFIX}{call.request_id}", None, Record(version=LATEST_HANDSHAKE), None,
                      stored=False)
        try:
            response = await connect(call, agent, member, server, call.messages[0])
            async with response:
                await relay.answer(call, response, receive, send, extra)
        finally:
            for upstream in agent.record.upstreams.values():
                await close_session(server, upstream)


endpoint = PlaygroundEndpoint()


@dataclass(frozen=True)
class Update:
    """What the page shows while the call runs: ``progress`` or ``notice``."""

    kind: str
    data: dict[str, Any]


@dataclass
class Answer:
    """How the call ended: the upstream's result, or an error (the gateway's or the upstream's)."""

    result: dict[str, Any] | None = None
    error: dict[str, Any] | None = None
    status: int = 0
    latency_ms: float | None = None

    @property
    def quota_reached(self) -> bool:
        return self.error is not None and self.error.get("code") == QUOTA_CODE and self.status == 429

    @property
    def needs_connection(self) -> bool:
        return self.error is not None and self.error.get("code") == URL_ELICITATION_REQUIRED and self.status == 403


@dataclass
class Reader:
    """The ASGI ``send`` of the in-process request: reads the answer the way an agent would."""

    token: str
    updates: asyncio.Queue[Update | None]
    started: float = field(default_factory=time.perf_counter)
    answer: Answer = field(default_factory=Answer)
    streaming: bool = False
    parser: sse.Parser = field(default_factory=sse.Parser)
    body: bytearray = field(default_factory=bytearray)

    async def send(self, message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            self.answer.status = message["status"]
            content_type = dict(message.get("headers", [])).get(b"content-type", b"")
            self.streaming = content_type.split(b";")[0].strip().lower() == b"text/event-stream"
            return
        chunk = message.get("body", b"")
        more = message.get("more_body", False)
        if self.streaming:
            events = self.parser.feed(chunk)
            if not more:
                closing, pending = self.parser.close()
                events += closing + ([pending] if pending is not None else [])
            for event in events:
                if event.data:
                    self.take(event.data)
            return
        self.body += chunk
        if not more and self.body:
            self.take(bytes(self.body))

    def take(self, data: bytes) -> None:
        try:
            parsed = parse_json(data)
        except ValueError:
            return
        for message in parsed if isinstance(parsed, list) else [parsed]:
            if isinstance(message, dict):
                self.message(message)

    def message(self, message: dict[str, Any]) -> None:
        method = message.get("method")
        params = message.get("params") if isinstance(message.get("params"), dict) else {}
        if method == "notifications/progress":
            if params.get("progressToken") == self.token:
                self.updates.put_nowait(Update("progress", progress_of(params)))
        elif isinstance(method, str) and "id" in message:
            self.updates.put_nowait(Update("notice", {"text": (
                f"The tool asked the client for {display_text(method, 100)!r}; the playground cannot answer "
                "that, so the call waits until the upstream gives up.")}))
        elif isinstance(method, str):
            self.updates.put_nowait(Update("notice", {"text": notice_of(method, params)}))
        elif self.answers(message) and self.answer.result is None and self.answer.error is None:
            self.answer.latency_ms = round((time.perf_counter() - self.started) * 1000, 1)
            if isinstance(message.get("result"), dict):
                self.answer.result = message["result"]
            else:
                error = message.get("error") if isinstance(message.get("error"), dict) else {}
                self.answer.error = {"code": error.get("code") if isinstance(error.get("code"), int) else None,
                                     "message": display_text(str(error.get("message", "")), MAX_NOTICE * 4),
                                     "data": shown_json(error["data"]) if "data" in error else ""}


    @staticmethod
    def answers(message: dict[str, Any]) -> bool:
        """The response to our call; an error with a null id too: the gateway refuses a request it
        has not read yet (an unknown or disabled server, a missing connection) that way."""
        return message.get("id") == CALL_ID or (message.get("id") is None and "error" in message)


def progress_of(params: dict[str, Any]) -> dict[str, Any]:
    def number(value: Any) -> float | None:
        if not isinstance(value, int | float) or isinstance(value, bool):
            return None
        try:
            return float(value)
        except OverflowError:  # an integer past any float: JSON allows it, the page need not show it
            return None

    message = params.get("message")
    return {"progress": number(params.get("progress")), "total": number(params.get("total")),
            "message": display_text(message, MAX_NOTICE) if isinstance(message, str) else ""}


def notice_of(method: str, params: dict[str, Any]) -> str:
    if method == "notifications/message":
        level = params.get("level") if isinstance(params.get("level"), str) else "info"
        data = params.get("data")
        text = data if isinstance(data, str) else json.dumps(data)
        return display_text(f"{level}: {text}", MAX_NOTICE)
    return display_text(method, MAX_NOTICE)


def shown_json(value: Any) -> str:
    text = json.dumps(value, indent=2, ensure_ascii=False)
    return text if len(text) <= MAX_JSON_SHOWN else text[:MAX_JSON_SHOWN] + "\n… (cut)"


def _capped(text: str) -> str:
    return text if len(text) <= MAX_TEXT else text[:MAX_TEXT] + "… (cut)"


def shown_block(block: Any) -> dict[str, str]:
    """One content block as plain values: text, an image as a ``data:`` URL (image types with valid
    base64 only), a resource link or resource as its name and URI, anything else as JSON."""
    if not isinstance(block, dict):
        return {"kind": "other", "text": shown_json(block)}
    kind = block.get("type")
    if kind == "text" and isinstance(block.get("text"), str):
        return {"kind": "text", "text": _capped(block["text"])}
    if kind == "image":
        mime, data = block.get("mimeType"), block.get("data")
        if isinstance(mime, str) and IMAGE_TYPE_RE.fullmatch(mime) and isinstance(data, str):
            try:
                base64.b64decode(data, validate=True)
            except (binascii.Error, ValueError):
                pass
            else:
                return {"kind": "image", "src": f"data:{mime};base64,{data}", "text": mime}
        return {"kind": "other", "text": "An image TwinMCP does not show (not an image type, or not base64)."}
    if kind in ("resource_link", "resource"):
        inner = block.get("resource") if kind == "resource" and isinstance(block.get("resource"), dict) else block
        uri = inner.get("uri") if isinstance(inner.get("uri"), str) else ""
        name = inner.get("name") if isinstance(inner.get("name"), str) else ""
        text = inner.get("text") if isinstance(inner.get("text"), str) else ""
        return {"kind": "link", "text": display_text(name or uri, 300), "uri": display_text(uri, 2000),
                "body": _capped(text)}
    return {"kind": "other", "text": shown_json(block)}


def shown_result(result: dict[str, Any]) -> dict[str, Any]:
    content = result.get("content") if isinstance(result.get("content"), list) else []
    structured = result.get("structuredContent")
    return {"is_error": result.get("isError") is True,
            "blocks": [shown_block(b) for b in content[:MAX_BLOCKS]],
            "more_blocks": max(0, len(content) - MAX_BLOCKS),
            "structured": shown_json(structured) if structured is not None else ""}


async def try_tool(*, identity: KeyInfo, server_id: uuid.UUID, tool: str, arguments: dict[str, Any],
                   answer: Answer) -> AsyncIterator[Update]:
    """Runs one ``tools/call`` through the pipeline; yields the updates as they arrive and fills
    ``answer`` by the end. Closing the iterator early is the client going away: the pipeline sees
    a disconnect, as it would for an agent."""
    token = f"{REQUEST_PREFIX}{uuid.uuid4().hex}"
    body = dumps({"jsonrpc": "2.0", "id": CALL_ID, "method": "tools/call",
                  "params": {"name": tool, "arguments": arguments, "_meta": {"progressToken": token}}})
    updates: asyncio.Queue[Update | None] = asyncio.Queue()
    reader = Reader(token=token, updates=updates, answer=answer)
    gone = asyncio.Event()
    delivered = False

    async def receive() -> dict[str, Any]:
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    scope = {"type": "http", "method": "POST", "path": f"/servers/{server_id}/playground/",
             "headers": [(b"x-request-id", token.encode())], IDENTITY: identity, SERVER: server_id}
    running = asyncio.ensure_future(endpoint(scope, receive, reader.send))
    running.add_done_callback(lambda _task: updates.put_nowait(None))
    try:
        while (update := await updates.get()) is not None:
            yield update
        await running
    finally:
        if not running.done():
            gone.set()
            await asyncio.gather(running, return_exceptions=True)
    if answer.result is None and answer.error is None:
        answer.error = {"code": None, "message": f"No answer to the call (HTTP {answer.status}).", "data": ""}
