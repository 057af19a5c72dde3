"""The tool playground: a form made from a tool's input schema, and calls made through the real
gateway pipeline as the signed-in user (governance, quota, per-user credentials, usage events),
with the upstream's progress streamed to the browser as it arrives."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import quote

import pytest
from django import forms
from django.test import AsyncClient, Client
from mcp.server.mcpserver import Context, Image, MCPServer
from mcp.server.mcpserver.exceptions import ToolError

from external_mcp import catalog, connections, health, services
from external_mcp.models import ExternalMcpServer
from external_mcp.playground import shown_block
from external_mcp.playground_form import ArgumentsForm, JSONValueField, ScalarListField
from tests import mcp_peers
from tests.gateway import close_gateway_connections, register
from usage.models import UsageEvent

SCHEMA = {
    "type": "object",
    "properties": {
        "text": {"type": "string", "description": "What to echo.", "default": "hello"},
        "count": {"type": "integer", "minimum": 1, "maximum": 5, "default": 2},
        "ratio": {"type": "number"},
        "loud": {"type": "boolean"},
        "strict": {"type": "boolean", "default": True},
        "colour": {"type": "string", "enum": ["red", "green"], "description": "A colour."},
        "level": {"enum": [1, 2, 3]},
        "tags": {"type": "array", "items": {"type": "string"}},
        "sizes": {"type": "array", "items": {"type": "integer"}, "default": [1, 2]},
        "modes": {"type": "array", "items": {"enum": ["a", "b"]}},
        "options": {"type": "object", "properties": {"deep": {"type": "string"}}},
        "maybe": {"type": ["string", "null"]},
    },
    "required": ["text", "strict"],
}


def fields_by_name(form: ArgumentsForm) -> dict[str, forms.Field]:
    return {form.names[key]: form.fields[key] for key in form.names}


def keys_of(schema: dict) -> dict[str, str]:
    """Property name -> form field name."""
    return {name: key for key, name in ArgumentsForm(schema).names.items()}


def bound(schema: dict, **data: Any) -> ArgumentsForm:
    keys = keys_of(schema)
    posted: dict[str, Any] = {"mode": data.pop("mode", "form")}
    for name, value in data.items():
        posted[keys.get(name, name)] = value
    return ArgumentsForm(schema, posted)


# -- the form from the schema --------------------------------------------------------------------------


def test_each_schema_type_gets_its_input_with_required_defaults_and_help():
    fields = fields_by_name(ArgumentsForm(SCHEMA))
    assert isinstance(fields["text"], forms.CharField) and fields["text"].required
    assert fields["text"].initial == "hello" and fields["text"].help_text == "What to echo."
    assert isinstance(fields["count"], forms.IntegerField) and fields["count"].initial == 2
    assert not fields["count"].required
    assert isinstance(fields["ratio"], forms.FloatField)
    assert isinstance(fields["loud"], forms.NullBooleanField)  # optional: "not sent" is a choice
    assert isinstance(fields["strict"], forms.BooleanField) and fields["strict"].initial is True
    assert isinstance(fields["colour"], forms.TypedChoiceField)
    assert [c[0] for c in fields["colour"].choices] == ["", "red", "green"]
    assert [c[0] for c in fields["level"].choices] == ["", "1", "2", "3"]
    assert isinstance(fields["tags"], ScalarListField) and isinstance(fields["sizes"], ScalarListField)
    assert isinstance(fields["modes"], forms.TypedMultipleChoiceField)
    assert isinstance(fields["options"], JSONValueField)  # nested object: typed as JSON
    assert isinstance(fields["maybe"], forms.CharField) and not isinstance(fields["maybe"], JSONValueField)
    assert json.loads(ArgumentsForm(SCHEMA).fields["arguments_json"].initial) == {
        "text": "hello", "count": 2, "strict": True, "sizes": [1, 2]}


def test_inputs_become_json_values_of_the_schema_types():
    form = bound(SCHEMA, text="hi", count="3", ratio="0.5", loud="true", strict="on", colour="green", level="2",
                 tags="a\n b \n\n", sizes="4\n5", modes=["b"], options='{"deep": "x"}')
    assert form.is_valid(), form.errors
    assert form.arguments == {"text": "hi", "count": 3, "ratio": 0.5, "loud": True, "strict": True,
                              "colour": "green", "level": 2, "tags": ["a", "b"], "sizes": [4, 5], "modes": ["b"],
                              "options": {"deep": "x"}}


def test_empty_optional_inputs_are_not_sent_and_a_required_boolean_is_false_when_unchecked():
    form = bound(SCHEMA, text="hi")
    assert form.is_valid(), form.errors
    assert form.arguments == {"text": "hi", "strict": False}


def test_invalid_arguments_are_reported_on_their_own_fields():
    form = bound(SCHEMA, text="", count="9", sizes="1\nx", options="{nope")
    assert not form.is_valid()
    errors = {form.names[key]: messages for key, messages in form.errors.items() if key in form.names}
    assert errors["text"] == ["This field is required."]
    assert errors["count"] == ["9 is greater than the maximum of 5"]
    assert errors["sizes"] == ["Line 2: 'x' is not an integer."]
    assert errors["options"][0].startswith("Not valid JSON")
    schema_only = bound(SCHEMA, text="ok", count="0")
    assert not schema_only.is_valid()  # the form accepts any integer: the minimum is the schema's, via jsonschema
    assert schema_only.errors[keys_of(SCHEMA)["count"]] == ["0 is less than the minimum of 1"]


def test_json_mode_sends_the_object_as_typed_and_names_the_failing_path():
    form = ArgumentsForm(SCHEMA, {"mode": "json", "arguments_json": '{"text": "x", "strict": false, "count": 1}'})
    assert form.is_valid(), form.errors
    assert form.arguments == {"text": "x", "strict": False, "count": 1}
    wrong = ArgumentsForm(SCHEMA, {"mode": "json", "arguments_json": '{"strict": 1, "tags": [1]}'})
    assert not wrong.is_valid()
    messages = wrong.errors["arguments_json"]
    assert any(m.startswith("text: ") for m in messages)
    assert any(m.startswith("strict: ") for m in messages) and any(m.startswith("tags/0: ") for m in messages)
    assert ArgumentsForm(SCHEMA, {"mode": "json", "arguments_json": "[1]"}).errors["arguments_json"] == [
        "The arguments must be a JSON object."]
    too_deep = ArgumentsForm(SCHEMA, {"mode": "json", "arguments_json": "[" * 200 + "]" * 200})
    assert not too_deep.is_valid() and "nested" in too_deep.errors["arguments_json"][0]


def test_a_schema_the_form_cannot_render_starts_in_json_mode_and_a_broken_one_is_no_crash():
    assert ArgumentsForm({"type": "object", "additionalProperties": True}).json_mode
    assert not ArgumentsForm(SCHEMA).json_mode
    broken = ArgumentsForm({"type": "object", "properties": {"a": {"$ref": "https://example.com/x.json"}}},
                           {"mode": "json", "arguments_json": '{"a": 1}'})
    assert broken.is_valid() and "could not be applied" in broken.schema_problem
    invalid = ArgumentsForm({"type": 12}, {"mode": "json", "arguments_json": "{}"})
    assert invalid.is_valid() and "not valid JSON Schema" in invalid.schema_problem


def test_result_blocks_show_images_only_for_image_types_with_base64():
    image = shown_block({"type": "image", "mimeType": "image/png", "data": "aGk="})
    assert image["src"] == "data:image/png;base64,aGk="
    assert "src" not in shown_block({"type": "image", "mimeType": "text/html", "data": "aGk="})
    assert "src" not in shown_block({"type": "image", "mimeType": "image/png", "data": "\"><script>"})
    link = shown_block({"type": "resource_link", "uri": "file:///x", "name": "x"})
    assert link == {"kind": "link", "text": "x", "uri": "file:///x", "body": ""}


# -- the page: who may open it ---------------------------------------------------------------------------


PUBLIC_URL = "https://93.184.215.14/mcp"


def page(server, tool: str = "echo") -> str:
    return f"/servers/{server.pk}/playground/?tool={quote(tool, safe='')}"


@pytest.fixture
def listed_server(admin, flag_on):
    server = services.server_create(workspace=admin.workspace, actor=admin.user, name="alpha", base_url=PUBLIC_URL)
    catalog.catalog_sync(server=server, tools=[{"name": "echo", "description": "Echo <b>it</b>.",
                                                 "inputSchema": SCHEMA}])
    catalog.tools_approve(server=server, actor=admin.user, select_all=True)
    return server


def test_admin_and_member_see_the_form_outsider_and_anonymous_do_not(client, admin, member, outsider, listed_server):
    client.force_login(admin.user)
    response = client.get(page(listed_server))
    body = response.content.decode()
    assert response.status_code == 200
    assert 'name="arg0"' in body and 'value="hello"' in body and "What to echo." in body
    assert '<option value="green">green</option>' in body and 'name="arg11"' in body
    assert "Echo &lt;b&gt;it&lt;/b&gt;." in body  # the upstream's text, escaped
    assert body.count('<span class="req" aria-hidden="true">*</span>') == 2  # text and strict
    client.force_login(member.user)
    assert client.get(page(listed_server)).status_code == 200
    client.force_login(outsider.user)
    assert client.get(page(listed_server)).status_code == 404
    assert client.post(page(listed_server), {"tool": "echo", "mode": "json", "arguments_json": "{}"}).status_code == 404
    client.logout()
    assert client.get(page(listed_server)).status_code == 302


def test_an_unknown_tool_is_a_404_and_the_tools_panel_links_approved_tools_only(admin_web, listed_server, admin):
    assert admin_web.get(page(listed_server, "nope")).status_code == 404
    assert admin_web.get(page(listed_server, "echo\x00")).status_code == 404  # PostgreSQL text cannot hold NUL
    assert admin_web.get(f"/servers/{listed_server.pk}/playground/").status_code == 404
    detail = admin_web.get(f"/servers/{listed_server.pk}/").content.decode()
    assert f'href="/servers/{listed_server.pk}/playground/?tool=echo"' in detail
    catalog.tools_disable(server=listed_server, actor=admin.user, names=["echo"])
    assert "playground/?tool=" not in admin_web.get(f"/servers/{listed_server.pk}/").content.decode()


def test_the_post_needs_the_csrf_token(admin, listed_server):
    client = Client(enforce_csrf_checks=True)
    client.force_login(admin.user)
    response = client.post(page(listed_server), {"tool": "echo", "mode": "json", "arguments_json": "{}"})
    assert response.status_code == 403


def test_invalid_arguments_come_back_as_the_form_with_field_errors(admin_web, listed_server):
    keys = keys_of(SCHEMA)
    response = admin_web.post(page(listed_server), {"tool": "echo", "mode": "form", keys["text"]: "",
                                                    keys["count"]: "9"}, HTTP_ACCEPT="text/event-stream")
    body = response.content.decode()
    assert response.status_code == 422 and response["Content-Type"].startswith("text/html")
    assert body.lstrip().startswith('<form method="post"')  # the form alone, for the script to swap in
    assert "This field is required." in body and "9 is greater than the maximum of 5" in body
    assert UsageEvent.objects.count() == 0


# -- calls through the gateway pipeline --------------------------------------------------------------------


def gated_server(gate: threading.Event) -> MCPServer:
    """The demo tools, plus one that reports progress and then waits for the test to release it
    (so a test can see the progress arrive while the call is still running), and one with an
    image and markup in its answer."""
    server = mcp_peers.build_demo_server("peer-playground")

    @server.tool(description="Report progress, then wait until the test releases the call.")
    async def gated(label: str, ctx: Context) -> str:
        await ctx.report_progress(1, 2, f"{label}: waiting")
        for _ in range(3000):  # at most a minute: only a broken test leaves the gate closed
            if gate.is_set():
                break
            await asyncio.sleep(0.02)
        await ctx.info(f"{label}: holding")
        await ctx.report_progress(2, 2, f"{label}: released")
        return f"{label} done"

    @server.tool(description="Fail the way a tool fails: an isError result.")
    def fail() -> str:
        raise ToolError("boom <i>hostile</i>")

    @server.tool(description="An image and some markup.")
    def picture() -> list[Any]:
        return ["<script>alert(1)</script>", Image(data=b"\x89PNG\r\n\x1a\n", format="png").to_image_content()]

    return server


@pytest.fixture
def gate():
    event = threading.Event()
    yield event
    event.set()


@pytest.fixture
def peer(gate):
    with mcp_peers.mcp_peer(name="peer-playground", server_factory=lambda: gated_server(gate)) as running:
        yield running


@pytest.fixture
def live_db(settings, proxy_settings):
    settings.ALLOWED_HOSTS = [*settings.ALLOWED_HOSTS, "testserver"]  # the test client's host, for the page


@pytest.fixture(scope="module", autouse=True)
def _worker_connections(django_db_blocker):
    """The pipeline's worker threads keep database connections open: end them with the module,
    so the test database can be dropped."""
    yield
    from django.db import connection

    with django_db_blocker.unblock():
        connection.close()  # a fresh one: another module's teardown may have ended this one already
        close_gateway_connections()


def run(scenario: Any) -> Any:
    """``asyncio.run`` for a test's client, closing what its views opened on that loop on the way out."""
    from asgiref.sync import sync_to_async
    from django.db import connections as db_connections

    from external_mcp.gateway import transport
    from usage.recorder import get_recorder

    async def closing() -> Any:
        try:
            return await scenario
        finally:
            await sync_to_async(db_connections.close_all)()
            await transport.close_session()  # what the server's lifespan does when its loop ends
            await get_recorder().close()

    return asyncio.run(closing())


LIVE = ("midday", "proxy_settings", "flag_on", "live_db")
"""What a test of a real call needs: committed data (the pipeline reads from other threads),
loopback upstreams allowed, an empty quota, and the worker threads' connections closed after."""


async def _client(user) -> AsyncClient:
    client = AsyncClient()
    await client.aforce_login(user)
    return client


async def _events(response) -> AsyncIterator[tuple[str, dict]]:
    """The browser's view of the stream: (event, data) pairs as each blank line arrives."""
    from external_mcp import sse

    parser = sse.Parser()
    async for chunk in response.streaming_content:
        for event in parser.feed(chunk):
            kind = next(f for f in event.fields if f.startswith(b"event: "))[7:].decode()
            yield kind, json.loads(event.data)


def post_form(user, server, tool: str, arguments: dict, *, stream: bool = False) -> Any:
    async def go():
        client = await _client(user)
        headers = {"Accept": "text/event-stream"} if stream else {}
        response = await client.post(page(server, tool), {"tool": tool, "mode": "json",
                                                          "arguments_json": json.dumps(arguments)}, headers=headers)
        if stream:
            return response, [event async for event in _events(response)]
        return response, response.content.decode()

    return run(go())


@pytest.mark.parametrize("peer_kind", ["stateful", "stateless"])
@pytest.mark.usefixtures(*LIVE)
@pytest.mark.django_db(transaction=True)
def test_a_call_returns_the_result_and_is_recorded_for_the_user(admin, peer_kind):
    factory = mcp_peers.default_peer if peer_kind == "stateful" else mcp_peers.stateless_peer
    with factory() as upstream:
        server = register(admin, upstream)
        response, body = post_form(admin.user, server, "add", {"a": 2, "b": 3})
        session_ids = {r.headers.get("mcp-session-id") for r in upstream.requests if r.method == "DELETE"}
    assert response.status_code == 200
    assert 'id="playground-ok"' in body and "5.0" in body and "Answered in" in body
    event = UsageEvent.objects.get(method="tools/call")
    assert event.user_id == admin.user.pk and event.workspace_id == admin.workspace.pk
    assert event.server_id == server.pk and event.tool_name == "add" and event.counted and event.outcome == "ok"
    assert event.api_key_id is None and event.request_id.startswith("playground-")
    if peer_kind == "stateful":
        assert session_ids and None not in session_ids  # the session opened for the call is closed after it


@pytest.mark.usefixtures(*LIVE)
@pytest.mark.django_db(transaction=True)
def test_progress_streams_while_the_call_runs_then_the_escaped_result(admin, peer, gate):
    server = register(admin, peer)

    async def go():
        client = await _client(admin.user)
        response = await client.post(page(server, "gated"), {"tool": "gated", "mode": "form", "arg0": "job"},
                                     headers={"Accept": "text/event-stream"})
        assert response["Content-Type"] == "text/event-stream"
        seen: list[tuple[str, dict]] = []
        async for kind, data in _events(response):
            seen.append((kind, data))
            if kind == "progress" and data["progress"] == 1:
                assert not gate.is_set() and all(k != "answer" for k, _ in seen)
                gate.set()  # the first progress arrived while the tool was still waiting
        return seen

    seen = run(go())
    kinds = [kind for kind, _ in seen]
    assert kinds == ["started", "progress", "notice", "progress", "answer"]
    assert seen[2][1] == {"text": "info: job: holding"}
    assert seen[1][1] == {"progress": 1.0, "total": 2.0, "message": "job: waiting"}
    assert "job done" in seen[-1][1]["html"] and "Answered in" in seen[-1][1]["html"]
    picture = post_form(admin.user, server, "picture", {}, stream=True)[1][-1][1]["html"]
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in picture and "<script>" not in picture
    assert '<img class="playground-image" src="data:image/png;base64,' in picture
    failed = post_form(admin.user, server, "fail", {}, stream=True)[1][-1][1]["html"]
    assert 'id="playground-tool-error"' in failed and "boom &lt;i&gt;hostile&lt;/i&gt;" in failed


@pytest.mark.usefixtures(*LIVE)
@pytest.mark.django_db(transaction=True)
def test_the_quota_refuses_the_playground_as_it_refuses_agents(admin, settings):
    settings.EXTERNAL_MCP_FREE_DAILY_LIMIT = 1
    settings.TWINMCP_UPGRADE_URL = "https://billing.example.com/upgrade"
    with mcp_peers.stateless_peer() as upstream:
        server = register(admin, upstream)
        first = post_form(admin.user, server, "echo", {"text": "1"})[1]
        refused_response, refused = post_form(admin.user, server, "echo", {"text": "2"})
        upstream_calls = len(upstream.requests_to(rpc_method="tools/call"))
    assert 'id="playground-ok"' in first
    assert refused_response.status_code == 200
    assert "Daily limit reached" in refused and "Daily limit of 1 tool calls reached for the free plan" in refused
    assert 'href="https://billing.example.com/upgrade"' in refused
    assert upstream_calls == 1
    assert UsageEvent.objects.filter(outcome="quota", counted=False, user_id=admin.user.pk).count() == 1


@pytest.mark.usefixtures(*LIVE)
@pytest.mark.django_db(transaction=True)
def test_a_disabled_tool_is_refused_without_reaching_the_upstream(admin, member):
    with mcp_peers.stateless_peer() as upstream:
        server = register(admin, upstream)
        catalog.tools_disable(server=server, actor=admin.user, names=["echo"])
        upstream.clear_requests()
        _, body = post_form(member.user, server, "echo", {"text": "x"})
        assert upstream.requests_to(rpc_method="tools/call") == []
    assert "was disabled by a workspace admin" in body and 'id="playground-refused"' in body
    assert UsageEvent.objects.get().outcome == "blocked"


@pytest.mark.usefixtures(*LIVE)
@pytest.mark.django_db(transaction=True)
def test_per_user_credentials_are_the_callers_and_a_member_without_any_is_told_to_connect(admin, member, outsider):
    with mcp_peers.bearer_peer("admin-token", json_response=True) as upstream:
        server = services.server_create(workspace=admin.workspace, actor=admin.user, name="own", base_url=upstream.url,
                                        auth_type="bearer", credential_mode="per_user")
        connections.connection_save_secret(server=server, user=admin.user, credentials={"token": "admin-token"})
        result, server = health.check_now(ExternalMcpServer.objects.select_related("credential").get(pk=server.pk))
        assert result.ok, result.error_message
        catalog.tools_approve(server=server, actor=admin.user, select_all=True)
        upstream.clear_requests()
        _, member_body = post_form(member.user, server, "echo", {"text": "m"})
        assert upstream.requests == []
        _, admin_body = post_form(admin.user, server, "echo", {"text": "from-admin"})
        sent = {r.headers.get("authorization") for r in upstream.requests}
        outsider_status = post_form(outsider.user, server, "echo", {"text": "o"})[0].status_code
    assert "Connect first" in member_body and f'href="/servers/{server.pk}/#connection"' in member_body
    assert "from-admin" in admin_body and sent == {"Bearer admin-token"}
    assert "admin-token" not in admin_body and "admin-token" not in member_body
    assert outsider_status == 404
