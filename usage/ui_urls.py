"""The usage dashboard page (its data comes from the usage API, fetched by the browser)."""

from django.urls import path

from usage import alert_views, plan_views, quota_views, views

urlpatterns = [
    path("usage/", views.dashboard, name="usage-ui-dashboard"),
    path("usage/quota/", quota_views.quota_page, name="usage-ui-quota"),
    path("billing/", plan_views.plan_page, name="usage-ui-billing"),
    path("usage/alerts/", alert_views.alert_list, name="usage-ui-alerts"),
    path("usage/alerts/new/", alert_views.alert_add, name="usage-ui-alert-add"),
    path("usage/alerts/<uuid:rule_id>/edit/", alert_views.alert_edit, name="usage-ui-alert-edit"),
    path("usage/alerts/<uuid:rule_id>/toggle/", alert_views.alert_toggle, name="usage-ui-alert-toggle"),
    path("usage/alerts/<uuid:rule_id>/delete/", alert_views.alert_delete, name="usage-ui-alert-delete"),
]
