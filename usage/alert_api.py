"""REST API of the usage alert rules (``/api/v1/usage/alert-rules/``). Admins only: a rule of a
workspace the caller (or the key) is not in is a 404, a member gets 403. Thin: the rules live in
``usage.alerts``, whose field errors come back as 400s naming the field.

A rule's id is parsed here rather than by the URL converter, so that anything but a UUID is a JSON
404 and a change's body is judged (400, 413) before its rule is looked up."""

from __future__ import annotations

from typing import Any

from django.db.models import QuerySet
from django.http import Http404
from drf_spectacular.utils import extend_schema
from rest_framework import status
from rest_framework.exceptions import PermissionDenied
from rest_framework.permissions import IsAuthenticated
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from twinmcp.flags import ExternalMcpEnabled
from twinmcp.models import Membership, Role
from twinmcp.pagination import PAGINATION_PARAMETERS, BoundedLimitOffsetPagination
from twinmcp.scoping import key_workspace_ids, resolve_workspace
from usage import alerts
from usage.alert_serializers import AlertRuleSerializer, AlertRuleUpdateSerializer, AlertRuleWriteSerializer
from usage.models import AlertRule


class AlertRuleView(APIView):
    permission_classes = [IsAuthenticated, ExternalMcpEnabled]

    def roles(self) -> dict[Any, str]:
        memberships = Membership.objects.filter(user=self.request.user)
        restrict = key_workspace_ids(self.request)
        if restrict is not None:
            memberships = memberships.filter(workspace_id__in=restrict)
        return dict(memberships.values_list("workspace_id", "role"))

    def rules(self, workspace_ids: list[Any]) -> QuerySet[AlertRule]:
        return (AlertRule.objects.filter(workspace_id__in=workspace_ids)
                .select_related("workspace", "member", "server").with_last_breach())

    def get_rule(self, rule_id: Any) -> AlertRule:
        roles = self.roles()
        rule = self.rules(list(roles)).filter(pk=rule_id).first()
        if rule is None:
            raise Http404
        if roles[rule.workspace_id] != Role.ADMIN:
            raise PermissionDenied("Only workspace admins can see and change usage alerts.")
        return rule

    def shown(self, rule_id: Any) -> dict[str, Any]:
        return AlertRuleSerializer(self.get_rule(rule_id)).data


class AlertRuleListCreate(AlertRuleView):
    @extend_schema(parameters=PAGINATION_PARAMETERS, responses=AlertRuleSerializer(many=True))
    def get(self, request: Request) -> Response:
        admin_of = [workspace_id for workspace_id, role in self.roles().items() if role == Role.ADMIN]
        if not admin_of:
            raise PermissionDenied("Only workspace admins can see and change usage alerts.")
        paginator = BoundedLimitOffsetPagination()
        page = paginator.paginate_queryset(self.rules(admin_of).order_by("created_at", "id"), request, view=self)
        return paginator.get_paginated_response(AlertRuleSerializer(page, many=True).data)

    @extend_schema(request=AlertRuleWriteSerializer, responses={201: AlertRuleSerializer})
    def post(self, request: Request) -> Response:
        form = AlertRuleWriteSerializer(data=request.data)
        form.is_valid(raise_exception=True)
        workspace = resolve_workspace(request, form.validated_data.get("workspace"), admin=True)
        rule = alerts.alert_rule_create(workspace=workspace, actor=request.user, **form.service_fields())
        return Response(self.shown(rule.pk), status=status.HTTP_201_CREATED)


class AlertRuleDetail(AlertRuleView):
    @extend_schema(responses=AlertRuleSerializer)
    def get(self, request: Request, rule_id: Any) -> Response:
        return Response(self.shown(rule_id))

    @extend_schema(request=AlertRuleUpdateSerializer, responses=AlertRuleSerializer)
    def patch(self, request: Request, rule_id: Any) -> Response:
        form = AlertRuleUpdateSerializer(data=request.data, partial=True)
        form.is_valid(raise_exception=True)
        rule = self.get_rule(rule_id)
        alerts.alert_rule_update(rule=rule, actor=request.user, **form.service_fields())
        return Response(self.shown(rule_id))

    @extend_schema(responses={204: None})
    def delete(self, request: Request, rule_id: Any) -> Response:
        alerts.alert_rule_delete(rule=self.get_rule(rule_id), actor=request.user)
        return Response(status=status.HTTP_204_NO_CONTENT)
