"""The members page of a workspace: who belongs to it and with which role.

Every member sees the list; only its admins add, create, change roles and remove (anyone else gets
a 403 for those); a user who is not a member gets a 404, as for servers. Writes go through
``twinmcp.members``; a refused write (the last admin) comes back as a message on the list.
"""

from __future__ import annotations

from typing import Any

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.core.exceptions import PermissionDenied, ValidationError
from django.db.models.functions import Lower
from django.http import Http404, HttpRequest, HttpResponse
from django.shortcuts import redirect, render
from django.views.decorators.http import require_GET, require_http_methods, require_POST

from external_mcp.forms import apply_service_errors
from twinmcp import members, show_once
from twinmcp.member_forms import MemberAddForm, MemberCreateForm, MemberRoleForm
from twinmcp.models import Membership, Role, Workspace

NEW_PASSWORD = "new-member-password"


def _mine(request: HttpRequest, workspace_id: Any, *, admin: bool = False) -> Membership:
    """The caller's membership of the workspace: 404 for a non-member, 403 for a member when
    ``admin`` is asked."""
    mine = (Membership.objects.filter(user=request.user, workspace_id=workspace_id)
            .select_related("workspace").first())
    if mine is None:
        raise Http404("No such workspace.")
    if admin and mine.role != Role.ADMIN:
        raise PermissionDenied("Only admins of this workspace can change its members.")
    return mine


def _target(workspace: Workspace, user_id: int) -> Membership:
    if user_id > members.USER_ID_MAX:
        raise Http404("No such member.")
    target = Membership.objects.filter(workspace=workspace, user_id=user_id).select_related("user", "workspace").first()
    if target is None:
        raise Http404("No such member.")
    return target


def _page(request: HttpRequest, mine: Membership, *, add_form: MemberAddForm | None = None,
          create_form: MemberCreateForm | None = None, status: int = 200) -> HttpResponse:
    workspace = mine.workspace
    rows = list(Membership.objects.filter(workspace=workspace).select_related("user")
                .order_by(Lower("user__username")))
    admin_count = sum(1 for m in rows if m.role == Role.ADMIN)
    for row in rows:
        row.last_admin = row.role == Role.ADMIN and admin_count == 1
        row.role_form = MemberRoleForm(initial={"role": row.role}, auto_id=f"id_role_{row.user_id}_%s")
    new_password = show_once.pop(request, NEW_PASSWORD)
    if new_password is not None and new_password.get("workspace") != str(workspace.pk):
        new_password = None
    context = {
        "workspace": workspace,
        "can_admin": mine.role == Role.ADMIN,
        "rows": rows,
        "admin_count": admin_count,
        "workspaces": list(Membership.objects.filter(user=request.user).select_related("workspace")
                           .order_by(Lower("workspace__name"))),
        "add_form": add_form or MemberAddForm(),
        "create_form": create_form or MemberCreateForm(),
        "new_password": new_password,
    }
    response = render(request, "twinmcp/members.html", context, status=status)
    if new_password is not None:
        response["Cache-Control"] = "no-store"
    return response


@login_required
@require_GET
def members_home(request: HttpRequest) -> HttpResponse:
    """The members page of the caller's first workspace (the page offers the others)."""
    first = (Membership.objects.filter(user=request.user).order_by(Lower("workspace__name"))
             .values_list("workspace_id", flat=True).first())
    if first is None:
        return render(request, "twinmcp/members_none.html")
    return redirect("twinmcp-ui-members", workspace_id=first)


@login_required
@require_GET
def member_list(request: HttpRequest, workspace_id: Any) -> HttpResponse:
    return _page(request, _mine(request, workspace_id))


@login_required
@require_POST
def member_add(request: HttpRequest, workspace_id: Any) -> HttpResponse:
    mine = _mine(request, workspace_id, admin=True)
    form = MemberAddForm(request.POST)
    if form.is_valid():
        try:
            user = members.user_find(identifier=form.cleaned_data["user"])
            members.membership_add(workspace=mine.workspace, actor=request.user, user=user,
                                   role=form.cleaned_data["role"])
        except ValidationError as exc:
            apply_service_errors(exc, form)
        else:
            messages.success(request, f"{user.get_username()} added to {mine.workspace.name} as "
                                      f"{Role(form.cleaned_data['role']).label.lower()}.")
            return redirect("twinmcp-ui-members", workspace_id=mine.workspace_id)
    return _page(request, mine, add_form=form, status=400)


@login_required
@require_POST
def member_create(request: HttpRequest, workspace_id: Any) -> HttpResponse:
    mine = _mine(request, workspace_id, admin=True)
    form = MemberCreateForm(request.POST)
    if form.is_valid():
        data = form.cleaned_data
        try:
            membership, generated = members.membership_add_new_user(
                workspace=mine.workspace, actor=request.user, username=data["username"], email=data["email"],
                password=data["password"], role=data["role"])
        except ValidationError as exc:
            apply_service_errors(exc, form)
        else:
            username = membership.user.get_username()
            if generated:
                show_once.stash(request, NEW_PASSWORD, {"workspace": str(mine.workspace_id), "username": username,
                                                        "password": generated})
            messages.success(request, f"User {username} created and added to {mine.workspace.name}.")
            return redirect("twinmcp-ui-members", workspace_id=mine.workspace_id)
    return _page(request, mine, create_form=form, status=400)


@login_required
@require_POST
def member_role(request: HttpRequest, workspace_id: Any, user_id: int) -> HttpResponse:
    mine = _mine(request, workspace_id, admin=True)
    target = _target(mine.workspace, user_id)
    form = MemberRoleForm(request.POST)
    if not form.is_valid():
        messages.error(request, "Choose admin or member.")
    else:
        try:
            changed = members.membership_role_change(membership=target, actor=request.user,
                                                     role=form.cleaned_data["role"])
        except ValidationError as exc:
            messages.error(request, " ".join(exc.messages))
        else:
            messages.success(request, f"{target.user.get_username()} is now {changed.get_role_display().lower()}.")
    return redirect("twinmcp-ui-members", workspace_id=mine.workspace_id)


@login_required
@require_http_methods(["GET", "POST"])
def member_remove(request: HttpRequest, workspace_id: Any, user_id: int) -> HttpResponse:
    """GET asks for confirmation (a page, so it works without JavaScript); POST removes."""
    mine = _mine(request, workspace_id, admin=True)
    target = _target(mine.workspace, user_id)
    if request.method == "GET":
        return render(request, "twinmcp/member_confirm_remove.html", {"target": target, "workspace": mine.workspace})
    try:
        undone = members.membership_remove(membership=target, actor=request.user)
    except ValidationError as exc:
        messages.error(request, " ".join(exc.messages))
        return redirect("twinmcp-ui-members", workspace_id=mine.workspace_id)
    messages.success(request, f"{target.user.get_username()} removed from {mine.workspace.name}; "
                              f"{undone['keys']} API key{'s' if undone['keys'] != 1 else ''} revoked.")
    if target.user_id == request.user.pk:
        return redirect("home")
    return redirect("twinmcp-ui-members", workspace_id=mine.workspace_id)
