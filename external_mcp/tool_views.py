"""An admin switches single tools off and on again from the server's page (the tools panel)."""

from __future__ import annotations

from typing import Any

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.core.exceptions import ValidationError
from django.http import Http404, HttpRequest, HttpResponse, HttpResponseRedirect
from django.urls import reverse
from django.views.decorators.http import require_POST

from external_mcp import catalog
from external_mcp.views import _get_server, _next_url, _partial, _render, _tools_context
from twinmcp.context_processors import require_external_mcp_page

SWITCHES = {"disable": (catalog.tools_disable, "Disabled"), "enable": (catalog.tools_enable, "Enabled")}


@login_required
@require_POST
def server_tools_switch(request: HttpRequest, server_id: Any, action: str) -> HttpResponse:
    require_external_mcp_page(request)
    if action not in SWITCHES:
        raise Http404("No such action.")
    server = _get_server(request, server_id, admin=True)
    switch, done = SWITCHES[action]
    error = switched = None
    try:
        switched = switch(server=server, actor=request.user, names=request.POST.getlist("names"))
    except ValidationError as exc:
        error = " ".join(exc.messages)
    note = f"{done}: {', '.join(switched)}." if switched else None
    if not _partial(request):
        if error:
            messages.error(request, error)
        else:
            messages.success(request, note or "")
        return HttpResponseRedirect(_next_url(request, reverse("external_mcp-ui-server", args=[server.pk]) + "#tools"))
    return _render(request, "external_mcp/_tools.html", _tools_context(request, server, tools_error=error,
                                                                         switched=note))
