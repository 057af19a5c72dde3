"""Routes of the usage alert rules API (``usage.alert_api``)."""

from django.urls import path

from usage import alert_api

urlpatterns = [
    path("api/v1/usage/alert-rules/", alert_api.AlertRuleListCreate.as_view(), name="usage-alert-rules"),
    path("api/v1/usage/alert-rules/<uuid:rule_id>/", alert_api.AlertRuleDetail.as_view(), name="usage-alert-rule"),
]
