"""Admin pages of the server registry, toolsets and the notification inbox (see external_mcp.views
and external_mcp.toolset_views)."""

from django.urls import path

from external_mcp import (
    connection_views,
    form_views,
    notification_views,
    playground_views,
    tool_views,
    toolset_views,
    views,
)

urlpatterns = [
    path("servers/", views.server_list, name="external_mcp-ui-servers"),
    path("servers/new/", views.server_add, name="external_mcp-ui-server-add"),
    path("servers/<uuid:server_id>/", views.server_detail, name="external_mcp-ui-server"),
    path("servers/<uuid:server_id>/edit/", views.server_edit, name="external_mcp-ui-server-edit"),
    path("servers/new/test/", form_views.server_add_test, name="external_mcp-ui-server-add-test"),
    path("servers/<uuid:server_id>/edit/test/", form_views.server_edit_test, name="external_mcp-ui-server-edit-test"),
    path("servers/<uuid:server_id>/test/", views.server_test, name="external_mcp-ui-server-test"),
    path("servers/<uuid:server_id>/toggle/", views.server_toggle, name="external_mcp-ui-server-toggle"),
    path("servers/<uuid:server_id>/delete/", views.server_delete, name="external_mcp-ui-server-delete"),
    path("servers/<uuid:server_id>/rotate/", views.server_rotate, name="external_mcp-ui-server-rotate"),
    path("servers/<uuid:server_id>/connect/", connection_views.server_connect, name="external_mcp-ui-server-connect"),
    path("servers/<uuid:server_id>/disconnect/", connection_views.server_disconnect,
         name="external_mcp-ui-server-disconnect"),
    path("servers/<uuid:server_id>/my-credentials/", connection_views.server_own_secret,
         name="external_mcp-ui-server-own-secret"),
    path("oauth/callback", connection_views.oauth_callback, name="external_mcp-oauth-callback"),
    path("servers/<uuid:server_id>/tools/approve/", views.server_tools_approve,
         name="external_mcp-ui-server-tools-approve"),
    path("servers/<uuid:server_id>/tools/<slug:action>/", tool_views.server_tools_switch,
         name="external_mcp-ui-server-tools-switch"),
    path("servers/<uuid:server_id>/playground/", playground_views.tool_playground,
         name="external_mcp-ui-server-playground"),
    path("toolsets/", toolset_views.toolset_list, name="external_mcp-ui-toolsets"),
    path("toolsets/new/", toolset_views.toolset_add, name="external_mcp-ui-toolset-add"),
    path("toolsets/<uuid:toolset_id>/", toolset_views.toolset_detail, name="external_mcp-ui-toolset"),
    path("toolsets/<uuid:toolset_id>/edit/", toolset_views.toolset_edit, name="external_mcp-ui-toolset-edit"),
    path("toolsets/<uuid:toolset_id>/delete/", toolset_views.toolset_delete, name="external_mcp-ui-toolset-delete"),
    path("notifications/", notification_views.notifications, name="external_mcp-ui-notifications"),
    path("notifications/bell/", notification_views.bell, name="external_mcp-ui-bell"),
    path("notifications/read-all/", notification_views.notifications_read_all,
         name="external_mcp-ui-notifications-read-all"),
    path("notifications/<uuid:notification_id>/read/", notification_views.notification_read,
         name="external_mcp-ui-notification-read"),
]
