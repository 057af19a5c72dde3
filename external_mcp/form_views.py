""""Test connection" on the add and edit forms: the settings as typed, before they are saved.

Nothing is stored (see ``external_mcp.trial``): no server, check, status change, notification,
audit event or secret. htmx gets the result panel (and the warning next to Save, out of band);
without JavaScript the button submits the form here and the whole form comes back with the result.
"""

from __future__ import annotations

import logging
from typing import Any

from django.contrib.auth.decorators import login_required
from django.core.exceptions import ValidationError
from django.http import HttpRequest, HttpResponse
from django.views.decorators.http import require_POST

from external_mcp import catalog, storable, trial
from external_mcp.choices import AuthType, Transport
from external_mcp.forms import CredentialsForm, ServerForm, apply_service_errors
from external_mcp.models import ExternalMcpServer
from external_mcp.views import (
    _all_valid,
    _cred_form,
    _form_page,
    _get_server,
    _partial,
    _render,
    check_summary,
    workspaces_to_add_to,
)
from twinmcp.context_processors import require_external_mcp_page

logger = logging.getLogger(__name__)

MAX_TOOLS_LISTED = 200
COULD_NOT_RUN = {"ok": False, "label": "The test could not run", "error_class": "internal",
                 "message": "An internal error stopped the test; the logs have the details.", "hint": ""}
TOO_MANY = "Too many tests in the last minute; wait a moment, then test again."


@login_required
@require_POST
def server_add_test(request: HttpRequest) -> HttpResponse:
    require_external_mcp_page(request)
    form = ServerForm(request.POST, workspaces=workspaces_to_add_to(request))
    cred_form = _cred_form(None, request.POST.get("auth_type") or AuthType.NONE, request.POST, request.FILES,
                           owner=request.user)
    return _trial_response(request, server=None, form=form, cred_form=cred_form)


@login_required
@require_POST
def server_edit_test(request: HttpRequest, server_id: Any) -> HttpResponse:
    require_external_mcp_page(request)
    server = _get_server(request, server_id, admin=True)
    form = ServerForm(request.POST)
    cred_form = _cred_form(server, request.POST.get("auth_type") or server.auth_type, request.POST, request.FILES,
                           owner=request.user)
    return _trial_response(request, server=server, form=form, cred_form=cred_form)


def _trial_response(request: HttpRequest, *, server: ExternalMcpServer | None, form: ServerForm,
                    cred_form: CredentialsForm) -> HttpResponse:
    outcome, status = _trial(request, server=server, form=form, cred_form=cred_form)
    if _partial(request):
        # 200 whatever the outcome: htmx swaps only successful answers, and the panel is the answer.
        return _render(request, "external_mcp/_trial_result.html", {"trial": outcome, "oob": True})
    return _form_page(request, server=server, form=form, cred_form=cred_form, status=status, trial=outcome)


def _trial(request: HttpRequest, *, server: ExternalMcpServer | None, form: ServerForm,
           cred_form: CredentialsForm) -> tuple[dict[str, Any], int]:
    if not trial.trial_allowed(user_id=request.user.pk):
        return {"refused": TOO_MANY}, 429
    valid = _all_valid(form, cred_form)
    auth_type = cred_form.auth_type
    prepared = None
    if "base_url" in form.cleaned_data and cred_form.is_valid():
        # Checked even when another field is wrong, so every problem is listed at once.
        mode = form.cleaned_data.get("credential_mode") or (server.credential_mode if server else "")
        new = server is None or auth_type != server.auth_type or mode != server.credential_mode
        try:
            credentials = trial.credentials_to_test(server=None if new else server, auth_type=auth_type,
                                                    base_url=form.cleaned_data["base_url"],
                                                    typed=cred_form.payload(new=new))
            prepared = trial.trial_prepare(base_url=form.cleaned_data["base_url"], auth_type=auth_type,
                                           credentials=credentials,
                                           transport=form.cleaned_data.get("transport") or Transport.AUTO)
        except ValidationError as exc:
            apply_service_errors(exc, form, cred_form)
            valid = False
        except trial.TrialRefused as exc:
            if valid:
                return {"refused": str(exc)}, 200
    if not valid or prepared is None:
        return {"errors": _errors(form, cred_form)}, 400
    try:
        result = trial.trial_run(prepared)
    except Exception:  # noqa: BLE001 - a test that cannot run is a result to show, not a 500
        logger.exception("connection test of unsaved settings could not run")
        return {"test": COULD_NOT_RUN}, 200
    tools = [{"name": storable.display_text(entry["name"], 200),
              "description": storable.display_text(str(entry.get("description") or ""), 160)}
             for entry in result.tools if catalog.is_tool_entry(entry)] if result.ok else []
    shown = {"tools": tools[:MAX_TOOLS_LISTED], "more": max(0, len(tools) - MAX_TOOLS_LISTED)}
    return {"test": check_summary(result), **shown}, 200


def _errors(*forms_: Any) -> list[dict[str, str]]:
    """Every error of the forms, with the label and id of the field it belongs to (for links)."""
    rows: list[dict[str, str]] = []
    for form in forms_:
        for name, errors in form.errors.items():
            field = form[name] if name in form.fields else None
            for error in errors:
                rows.append({"label": str(field.label) if field else "", "id": field.auto_id if field else "",
                             "message": error})
    return rows
