"""REST API of a workspace's members: list and add (``/api/v1/workspaces/<id>/members/``), change a
role and remove (``…/members/<user id>/``). Members read, admins write (403), anyone else gets a
404; an API key acts only in its own workspace. Writes go through ``twinmcp.members``."""

from __future__ import annotations

from typing import Any

from drf_spectacular.utils import extend_schema
from rest_framework import status
from rest_framework.exceptions import NotFound, PermissionDenied
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from twinmcp import members
from twinmcp.member_serializers import (
    MemberAddSerializer,
    MemberCreatedSerializer,
    MemberRoleSerializer,
    MemberSerializer,
)
from twinmcp.models import Membership, Role
from twinmcp.scoping import key_workspace_ids


def _mine(request: Request, workspace_id: Any, *, admin: bool = False) -> Membership:
    restrict = key_workspace_ids(request)
    mine = Membership.objects.filter(user=request.user, workspace_id=workspace_id).select_related("workspace").first()
    if mine is None or (restrict is not None and mine.workspace_id not in restrict):
        raise NotFound("No such workspace.")
    if admin and mine.role != Role.ADMIN:
        raise PermissionDenied("Only admins of this workspace can change its members.")
    return mine


def _target(mine: Membership, user_id: int) -> Membership:
    if user_id > members.USER_ID_MAX:
        raise NotFound("No such member.")
    target = (Membership.objects.filter(workspace_id=mine.workspace_id, user_id=user_id)
              .select_related("user", "workspace").first())
    if target is None:
        raise NotFound("No such member.")
    return target


class MemberListCreate(APIView):
    @extend_schema(responses=MemberSerializer(many=True))
    def get(self, request: Request, workspace_id: Any) -> Response:
        mine = _mine(request, workspace_id)
        rows = (Membership.objects.filter(workspace_id=mine.workspace_id).select_related("user")
                .order_by("user__username"))
        return Response(MemberSerializer(rows, many=True).data)

    @extend_schema(request=MemberAddSerializer, responses={201: MemberCreatedSerializer})
    def post(self, request: Request, workspace_id: Any) -> Response:
        mine = _mine(request, workspace_id, admin=True)
        form = MemberAddSerializer(data=request.data)
        form.is_valid(raise_exception=True)
        data = form.validated_data
        generated = None
        if data.get("user"):
            user = members.user_find(identifier=data["user"])
            membership = members.membership_add(workspace=mine.workspace, actor=request.user, user=user,
                                                role=data["role"])
        else:
            membership, generated = members.membership_add_new_user(
                workspace=mine.workspace, actor=request.user, username=data["username"], email=data["email"],
                password=data["password"], role=data["role"])
        membership.password = generated  # type: ignore[attr-defined]
        response = Response(MemberCreatedSerializer(membership).data, status=status.HTTP_201_CREATED)
        response["Cache-Control"] = "no-store"
        return response


class MemberDetail(APIView):
    @extend_schema(request=MemberRoleSerializer, responses=MemberSerializer)
    def patch(self, request: Request, workspace_id: Any, user_id: int) -> Response:
        mine = _mine(request, workspace_id, admin=True)
        target = _target(mine, user_id)
        form = MemberRoleSerializer(data=request.data)
        form.is_valid(raise_exception=True)
        changed = members.membership_role_change(membership=target, actor=request.user,
                                                 role=form.validated_data["role"])
        return Response(MemberSerializer(changed).data)

    @extend_schema(responses={204: None})
    def delete(self, request: Request, workspace_id: Any, user_id: int) -> Response:
        mine = _mine(request, workspace_id, admin=True)
        members.membership_remove(membership=_target(mine, user_id), actor=request.user)
        return Response(status=status.HTTP_204_NO_CONTENT)
