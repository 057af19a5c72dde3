"""The tool playground page: a form made from a tool's input schema, and the call it submits,
run through the gateway pipeline as the signed-in user (``external_mcp.playground``).

Members may try the tools of their workspace's servers as admins can: with an API key they could
call the same tools as agents, under the same quota and governance, so the page grants nothing new.
A browser that asks for an event stream gets the call's progress as it happens and the result as
its last event; without JavaScript the form posts normally and the page comes back with the result.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from asgiref.sync import sync_to_async
from django.conf import settings
from django.contrib.auth.decorators import login_required
from django.http import Http404, HttpRequest, HttpResponse, StreamingHttpResponse
from django.shortcuts import render
from django.template.loader import render_to_string
from django.urls import reverse
from django.views.decorators.http import require_http_methods

from external_mcp import sse
from external_mcp.choices import ToolState
from external_mcp.models import ExternalMcpServer, ExternalMcpTool
from external_mcp.playground import Answer, Update, identity_for, shown_result, try_tool
from external_mcp.playground_form import ArgumentsForm
from external_mcp.proxy_cache import KeyInfo
from external_mcp.views import _get_server
from twinmcp.context_processors import require_external_mcp_page

EVENT_STREAM = "text/event-stream"
MAX_UPDATES_SHOWN = 200
"""On the page without JavaScript, where updates are listed at the end rather than streamed."""


@dataclass
class Page:
    server: ExternalMcpServer
    tool: ExternalMcpTool
    form: ArgumentsForm
    identity: KeyInfo | None = None
    answer: Answer | None = None
    updates: list[Update] = field(default_factory=list)

    def context(self) -> dict[str, Any]:
        answer = self.answer
        return {
            "server": self.server, "tool": self.tool, "form": self.form, "answer": answer,
            "shown": shown_result(answer.result) if answer is not None and answer.result is not None else None,
            "updates": self.updates, "callable": self.tool.state == ToolState.APPROVED and self.server.enabled,
            "connect_url": reverse("external_mcp-ui-server", args=[self.server.pk]) + "#connection",
            "upgrade_url": settings.TWINMCP_UPGRADE_URL,
            "action": reverse("external_mcp-ui-server-playground", args=[self.server.pk]),
        }


def input_schema(tool: ExternalMcpTool) -> Any:
    """The schema agents were shown: the approved definition's, else the one last seen."""
    definition = tool.approved_definition if isinstance(tool.approved_definition, dict) else tool.definition
    schema = definition.get("inputSchema") if isinstance(definition, dict) else None
    return schema if isinstance(schema, dict) else tool.input_schema


def _page(request: HttpRequest, server_id: Any) -> Page:
    require_external_mcp_page(request)
    server = _get_server(request, server_id)
    name = request.POST.get("tool") if request.method == "POST" else request.GET.get("tool")
    tool = server.tools.filter(name=name).first() if name and "\x00" not in name else None
    if tool is None:
        raise Http404("No such tool.")
    data = request.POST if request.method == "POST" else None
    page = Page(server=server, tool=tool, form=ArgumentsForm(input_schema(tool), data))
    if data is not None and page.form.is_valid():
        page.identity = identity_for(user=request.user, workspace_id=server.workspace_id)
    return page


def _render(request: HttpRequest, page: Page, *, partial: str | None = None) -> HttpResponse:
    status = 422 if page.form.is_bound and page.form.errors else 200
    name = f"external_mcp/playground.html#{partial}" if partial else "external_mcp/playground.html"
    return render(request, name, page.context(), status=status)


def _event(kind: str, data: dict[str, Any]) -> bytes:
    frame = sse.Event(raw=b"", data=None, event_id=None, fields=(f"event: {kind}".encode(),))
    return frame.with_data(json.dumps(data).encode())


async def _stream(page: Page) -> AsyncIterator[bytes]:
    assert page.identity is not None
    answer = page.answer = Answer()
    yield _event("started", {"tool": page.tool.name})
    async for update in try_tool(identity=page.identity, server_id=page.server.pk, tool=page.tool.name,
                                 arguments=page.form.arguments, answer=answer):
        yield _event(update.kind, update.data)
    html = render_to_string("external_mcp/playground.html#answer", page.context())
    yield _event("answer", {"html": html})


@login_required
@require_http_methods(["GET", "POST"])
async def tool_playground(request: HttpRequest, server_id: Any) -> HttpResponse:
    page = await sync_to_async(_page)(request, server_id)
    if page.identity is None:
        fragment = request.method == "POST" and EVENT_STREAM in request.headers.get("Accept", "")
        return await sync_to_async(_render)(request, page, partial="form" if fragment else None)
    if EVENT_STREAM in request.headers.get("Accept", ""):
        response = StreamingHttpResponse(_stream(page), content_type=EVENT_STREAM)
        response["Cache-Control"] = "no-cache"
        response["X-Accel-Buffering"] = "no"
        return response
    page.answer = Answer()
    async for update in try_tool(identity=page.identity, server_id=page.server.pk, tool=page.tool.name,
                                 arguments=page.form.arguments, answer=page.answer):
        if len(page.updates) < MAX_UPDATES_SHOWN:
            page.updates.append(update)
    return await sync_to_async(_render)(request, page)
