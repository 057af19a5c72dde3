"""MCP fixture server for the official conformance suite (@modelcontextprotocol/conformance 0.1.16).

Built with the Python SDK's `MCPServer`; implements every tool, resource, prompt and
utility that the suite's `server` scenarios call, with the names, arguments and results
the scenarios describe (mirroring the suite's own TypeScript "everything server").

    python -m tests.conformance.fixture_server --port 8931      # http://127.0.0.1:8931/mcp
    python -m tests.conformance.fixture_server --port 0         # any free port

It always binds 127.0.0.1 and serves streamable HTTP (stateful sessions, SSE responses,
resumability through an in-memory event store) at /mcp. Once it accepts connections it
prints one line to stdout, `READY http://127.0.0.1:<port>/mcp`, so a caller that asked
for port 0 learns the port. DNS-rebinding protection (Host/Origin allow-list for
localhost) is the SDK's default for a loopback bind; `--no-dns-rebinding-protection`
turns it off, to show what the `dns-rebinding-protection` scenario reports without it.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import logging
import socket
import sys
import warnings
from collections import deque
from typing import Any

import uvicorn
from mcp.server import ServerRequestContext
from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp.server.mcpserver.prompts.base import UserMessage
from mcp.server.streamable_http import EventCallback, EventMessage, EventStore
from mcp.server.transport_security import TransportSecuritySettings
from mcp.types import (
    AudioContent,
    Completion,
    CompletionArgument,
    CompletionContext,
    EmbeddedResource,
    EmptyResult,
    ImageContent,
    JSONRPCMessage,
    PromptReference,
    ResourceTemplateReference,
    SamplingMessage,
    SetLevelRequestParams,
    SubscribeRequestParams,
    TextContent,
    TextResourceContents,
    UnsubscribeRequestParams,
)

HOST = "127.0.0.1"
PATH = "/mcp"

logger = logging.getLogger("conformance.fixture")

# 1x1 red PNG and a minimal WAV, the same bytes the suite's reference server uses.
TEST_IMAGE_BASE64 = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8DwHwAFBQIAX8jx0gAAAABJRU5ErkJggg=="
TEST_AUDIO_BASE64 = "UklGRiYAAABXQVZFZm10IBAAAAABAAEAQB8AAAB9AAACABAAZGF0YQIAAAA="

# SEP-1613: served verbatim in tools/list for json_schema_2020_12_tool.
JSON_SCHEMA_2020_12_INPUT_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object",
    "$defs": {
        "address": {
            "type": "object",
            "properties": {"street": {"type": "string"}, "city": {"type": "string"}},
        }
    },
    "properties": {"name": {"type": "string"}, "address": {"$ref": "#/$defs/address"}},
    "additionalProperties": False,
}

# tools-call-elicitation: the requested schema the scenario documents.
ELICITATION_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "username": {"type": "string", "description": "User's response"},
        "email": {"type": "string", "description": "User's email address"},
    },
    "required": ["username", "email"],
}

# SEP-1034: a default for every primitive type.
SEP1034_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "description": "User name", "default": "John Doe"},
        "age": {"type": "integer", "description": "User age", "default": 30},
        "score": {"type": "number", "description": "User score", "default": 95.5},
        "status": {
            "type": "string",
            "description": "User status",
            "enum": ["active", "inactive", "pending"],
            "default": "active",
        },
        "verified": {"type": "boolean", "description": "Verification status", "default": True},
    },
    "required": [],
}

# SEP-1330: the five enum variants.
SEP1330_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "untitledSingle": {
            "type": "string",
            "description": "Select one option",
            "enum": ["option1", "option2", "option3"],
        },
        "titledSingle": {
            "type": "string",
            "description": "Select one option with titles",
            "oneOf": [
                {"const": "value1", "title": "First Option"},
                {"const": "value2", "title": "Second Option"},
                {"const": "value3", "title": "Third Option"},
            ],
        },
        "legacyEnum": {
            "type": "string",
            "description": "Select one option (legacy)",
            "enum": ["opt1", "opt2", "opt3"],
            "enumNames": ["Option One", "Option Two", "Option Three"],
        },
        "untitledMulti": {
            "type": "array",
            "description": "Select multiple options",
            "minItems": 1,
            "maxItems": 3,
            "items": {"type": "string", "enum": ["option1", "option2", "option3"]},
        },
        "titledMulti": {
            "type": "array",
            "description": "Select multiple options with titles",
            "minItems": 1,
            "maxItems": 3,
            "items": {
                "anyOf": [
                    {"const": "value1", "title": "First Choice"},
                    {"const": "value2", "title": "Second Choice"},
                    {"const": "value3", "title": "Third Choice"},
                ]
            },
        },
    },
    "required": [],
}


class InMemoryEventStore(EventStore):
    """Bounded in-memory event store: SSE resumability (SEP-1699) with Last-Event-ID replay."""

    def __init__(self, max_events: int = 10_000) -> None:
        self._events: deque[tuple[str, int, JSONRPCMessage | None]] = deque(maxlen=max_events)
        self._counter = 0

    async def store_event(self, stream_id: str, message: JSONRPCMessage | None) -> str:
        self._counter += 1
        self._events.append((stream_id, self._counter, message))
        return str(self._counter)

    async def replay_events_after(self, last_event_id: str, send_callback: EventCallback) -> str | None:
        try:
            last = int(last_event_id)
        except ValueError:
            return None
        stream_id = next((sid for sid, eid, _ in self._events if eid == last), None)
        if stream_id is None:
            return None
        for sid, eid, message in list(self._events):
            if sid == stream_id and eid > last and message is not None:  # None = priming event
                await send_callback(EventMessage(message, str(eid)))
        return stream_id


def create_server() -> MCPServer:
    """The fixture `MCPServer`, with everything the conformance `server` scenarios use."""
    mcp = MCPServer(name="twinmcp-conformance-fixture", version="1.0.0")
    subscriptions: set[str] = set()

    # ----- tools ---------------------------------------------------------------------------

    @mcp.tool()
    def test_simple_text() -> str:
        """Tests simple text content response"""
        return "This is a simple text response for testing."

    @mcp.tool()
    def test_image_content() -> list[ImageContent]:
        """Tests image content response"""
        return [ImageContent(type="image", data=TEST_IMAGE_BASE64, mime_type="image/png")]

    @mcp.tool()
    def test_audio_content() -> list[AudioContent]:
        """Tests audio content response"""
        return [AudioContent(type="audio", data=TEST_AUDIO_BASE64, mime_type="audio/wav")]

    @mcp.tool()
    def test_embedded_resource() -> list[EmbeddedResource]:
        """Tests embedded resource content response"""
        return [
            EmbeddedResource(
                type="resource",
                resource=TextResourceContents(
                    uri="test://embedded-resource",
                    mime_type="text/plain",
                    text="This is an embedded resource content.",
                ),
            )
        ]

    @mcp.tool()
    def test_multiple_content_types() -> list[TextContent | ImageContent | EmbeddedResource]:
        """Tests response with multiple content types (text, image, resource)"""
        return [
            TextContent(type="text", text="Multiple content types test:"),
            ImageContent(type="image", data=TEST_IMAGE_BASE64, mime_type="image/png"),
            EmbeddedResource(
                type="resource",
                resource=TextResourceContents(
                    uri="test://mixed-content-resource",
                    mime_type="application/json",
                    text=json.dumps({"test": "data", "value": 123}),
                ),
            ),
        ]

    @mcp.tool()
    async def test_tool_with_logging(ctx: Context) -> str:
        """Tests tool that emits log messages during execution"""
        await ctx.info("Tool execution started")
        await asyncio.sleep(0.05)
        await ctx.info("Tool processing data")
        await asyncio.sleep(0.05)
        await ctx.info("Tool execution completed")
        return "Tool with logging executed successfully"

    @mcp.tool()
    async def test_tool_with_progress(ctx: Context) -> str:
        """Tests tool that reports progress notifications"""
        for step in (0, 50, 100):
            if step:
                await asyncio.sleep(0.05)
            await ctx.report_progress(progress=step, total=100, message=f"Completed step {step} of 100")
        return "Tool with progress executed successfully"

    @mcp.tool()
    def test_error_handling() -> str:
        """Tests error response handling"""
        # ToolError: reported as an isError result and logged without a traceback.
        raise ToolError("This tool intentionally returns an error for testing")

    @mcp.tool()
    async def test_sampling(prompt: str, ctx: Context) -> str:
        """Tests server-initiated sampling (LLM completion request)"""
        try:
            result = await ctx.session.create_message(
                messages=[SamplingMessage(role="user", content=TextContent(type="text", text=prompt))],
                max_tokens=100,
                related_request_id=ctx.request_id,
            )
        except Exception as exc:
            return f"Sampling not supported or error: {exc}"
        text = result.content.text if getattr(result.content, "type", None) == "text" else "No response"
        return f"LLM response: {text}"

    @mcp.tool()
    async def test_elicitation(message: str, ctx: Context) -> str:
        """Tests server-initiated elicitation (user input request)"""
        try:
            result = await ctx.session.elicit_form(message, ELICITATION_SCHEMA, related_request_id=ctx.request_id)
        except Exception as exc:
            return f"Elicitation not supported or error: {exc}"
        return f"User response: action={result.action}, content={json.dumps(result.content or {})}"

    @mcp.tool()
    async def test_elicitation_sep1034_defaults(ctx: Context) -> str:
        """Tests elicitation with default values per SEP-1034"""
        try:
            result = await ctx.session.elicit_form(
                "Please review and update the form fields with defaults",
                SEP1034_SCHEMA,
                related_request_id=ctx.request_id,
            )
        except Exception as exc:
            return f"Elicitation not supported or error: {exc}"
        return f"Elicitation completed: action={result.action}, content={json.dumps(result.content or {})}"

    @mcp.tool()
    async def test_elicitation_sep1330_enums(ctx: Context) -> str:
        """Tests elicitation with enum schema improvements per SEP-1330"""
        try:
            result = await ctx.session.elicit_form(
                "Please select options from the enum fields", SEP1330_SCHEMA, related_request_id=ctx.request_id
            )
        except Exception as exc:
            return f"Elicitation not supported or error: {exc}"
        return f"Elicitation completed: action={result.action}, content={json.dumps(result.content or {})}"

    @mcp.tool(name="json_schema_2020_12_tool")
    def json_schema_2020_12_tool(name: str | None = None, address: dict[str, Any] | None = None) -> str:
        """Tool with JSON Schema 2020-12 features for conformance testing (SEP-1613)"""
        return f"JSON Schema 2020-12 tool called with: {json.dumps({'name': name, 'address': address})}"

    # The SDK derives inputSchema from the signature; serve the raw 2020-12 schema instead.
    mcp._tool_manager._tools["json_schema_2020_12_tool"].parameters = JSON_SCHEMA_2020_12_INPUT_SCHEMA

    @mcp.tool()
    async def test_reconnection(ctx: Context) -> str:
        """Tests SSE stream disconnection and client reconnection (SEP-1699): closes the stream mid-call"""
        await ctx.close_sse_stream()
        await asyncio.sleep(0.1)  # the client reconnects with Last-Event-ID and gets the result replayed
        return (
            "Reconnection test completed successfully. If you received this, "
            "the client properly reconnected after stream closure."
        )

    # ----- resources -----------------------------------------------------------------------

    @mcp.resource("test://static-text", name="static-text", title="Static Text Resource", mime_type="text/plain")
    def static_text() -> str:
        """A static text resource for testing"""
        return "This is the content of the static text resource."

    @mcp.resource("test://static-binary", name="static-binary", title="Static Binary Resource", mime_type="image/png")
    def static_binary() -> bytes:
        """A static binary resource (image) for testing"""
        return base64.b64decode(TEST_IMAGE_BASE64)

    @mcp.resource("test://template/{id}/data", name="template", title="Resource Template", mime_type="application/json")
    def template(id: str) -> str:
        """A resource template with parameter substitution"""
        return json.dumps({"id": id, "templateTest": True, "data": f"Data for ID: {id}"})

    @mcp.resource("test://watched-resource", name="watched-resource", title="Watched Resource", mime_type="text/plain")
    def watched_resource() -> str:
        """A resource that can be subscribed to for updates"""
        return "Watched resource content"

    async def subscribe(ctx: ServerRequestContext, params: SubscribeRequestParams) -> EmptyResult:
        subscriptions.add(str(params.uri))
        return EmptyResult()

    async def unsubscribe(ctx: ServerRequestContext, params: UnsubscribeRequestParams) -> EmptyResult:
        subscriptions.discard(str(params.uri))
        return EmptyResult()

    # ----- prompts -------------------------------------------------------------------------

    @mcp.prompt(title="Simple Test Prompt")
    def test_simple_prompt() -> list[UserMessage]:
        """A simple prompt without arguments"""
        return [UserMessage(content=TextContent(type="text", text="This is a simple prompt for testing."))]

    @mcp.prompt(title="Prompt With Arguments")
    def test_prompt_with_arguments(arg1: str, arg2: str) -> list[UserMessage]:
        """A prompt with required arguments"""
        text = f"Prompt with arguments: arg1='{arg1}', arg2='{arg2}'"
        return [UserMessage(content=TextContent(type="text", text=text))]

    @mcp.prompt(title="Prompt With Embedded Resource")
    def test_prompt_with_embedded_resource(resourceUri: str) -> list[UserMessage]:  # noqa: N803 - the wire name
        """A prompt that includes an embedded resource"""
        return [
            UserMessage(
                content=EmbeddedResource(
                    type="resource",
                    resource=TextResourceContents(
                        uri=resourceUri, mime_type="text/plain", text="Embedded resource content for testing."
                    ),
                )
            ),
            UserMessage(content=TextContent(type="text", text="Please process the embedded resource above.")),
        ]

    @mcp.prompt(title="Prompt With Image")
    def test_prompt_with_image() -> list[UserMessage]:
        """A prompt that includes image content"""
        return [
            UserMessage(content=ImageContent(type="image", data=TEST_IMAGE_BASE64, mime_type="image/png")),
            UserMessage(content=TextContent(type="text", text="Please analyze the image above.")),
        ]

    # ----- logging and completion ----------------------------------------------------------

    async def set_logging_level(ctx: ServerRequestContext, params: SetLevelRequestParams) -> EmptyResult:
        logger.info("log level set to %s", params.level)
        return EmptyResult()

    @mcp.completion()
    async def complete(
        ref: PromptReference | ResourceTemplateReference,
        argument: CompletionArgument,
        context: CompletionContext | None,
    ) -> Completion:
        return Completion(values=[], total=0, has_more=False)

    # MCPServer has no public hook for these three yet (the SDK's own everything-server does the same).
    lowlevel = mcp._lowlevel_server
    lowlevel.add_request_handler("logging/setLevel", SetLevelRequestParams, set_logging_level)
    lowlevel.add_request_handler("resources/subscribe", SubscribeRequestParams, subscribe)
    lowlevel.add_request_handler("resources/unsubscribe", UnsubscribeRequestParams, unsubscribe)
    return mcp


def create_app(*, dns_rebinding_protection: bool = True, retry_interval_ms: int = 1000):
    """The Starlette app serving the fixture at /mcp (stateful streamable HTTP with resumability)."""
    security = None if dns_rebinding_protection else TransportSecuritySettings(enable_dns_rebinding_protection=False)
    return create_server().streamable_http_app(
        streamable_http_path=PATH,
        event_store=InMemoryEventStore(),
        retry_interval=retry_interval_ms,
        transport_security=security,
        host=HOST,
    )


async def serve(port: int, *, dns_rebinding_protection: bool = True, log_level: str = "warning") -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((HOST, port))
    app = create_app(dns_rebinding_protection=dns_rebinding_protection)
    server = uvicorn.Server(uvicorn.Config(app, log_level=log_level, lifespan="on", timeout_graceful_shutdown=2))

    async def announce() -> None:
        while not server.started:
            await asyncio.sleep(0.02)
        print(f"READY http://{HOST}:{sock.getsockname()[1]}{PATH}", flush=True)

    announcer = asyncio.create_task(announce())
    try:
        await server.serve(sockets=[sock])
    finally:
        announcer.cancel()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=8931, help="port on 127.0.0.1 (0: any free port)")
    parser.add_argument("--log-level", default="warning", choices=["debug", "info", "warning", "error"])
    parser.add_argument(
        "--no-dns-rebinding-protection",
        action="store_true",
        help="accept any Host/Origin (the dns-rebinding-protection scenario then fails)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    # Logging/sampling are deprecated as of protocol 2026-07-28 but are what the 2025-11-25 scenarios exercise.
    warnings.filterwarnings("ignore", message=r".*deprecated as of 2026-07-28.*")
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(
            serve(args.port, dns_rebinding_protection=not args.no_dns_rebinding_protection, log_level=args.log_level)
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
