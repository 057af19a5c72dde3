from django.urls import path

from external_mcp import api

urlpatterns = [
    path("api/v1/external-mcp/servers/", api.ServerListCreate.as_view(), name="external_mcp-servers"),
    path("api/v1/external-mcp/servers/<uuid:server_id>/", api.ServerDetail.as_view(), name="external_mcp-server"),
    path(
        "api/v1/external-mcp/servers/<uuid:server_id>/credentials/",
        api.ServerCredentials.as_view(),
        name="external_mcp-server-credentials",
    ),
    path("api/v1/external-mcp/servers/<uuid:server_id>/oauth/start/", api.ServerOAuthStart.as_view(),
         name="external_mcp-server-oauth-start"),
    path("api/v1/external-mcp/servers/<uuid:server_id>/connections/", api.ServerConnections.as_view(),
         name="external_mcp-server-connections"),
    path("api/v1/external-mcp/servers/<uuid:server_id>/connections/<uuid:connection_id>/",
         api.ServerConnectionDetail.as_view(), name="external_mcp-server-connection"),
    path("api/v1/external-mcp/servers/<uuid:server_id>/connection/", api.ServerOwnConnection.as_view(),
         name="external_mcp-server-own-connection"),
    path("api/v1/external-mcp/servers/<uuid:server_id>/test/", api.ServerTest.as_view(),
         name="external_mcp-server-test"),
    path("api/v1/external-mcp/servers/<uuid:server_id>/tools/", api.ServerTools.as_view(),
         name="external_mcp-server-tools"),
    path("api/v1/external-mcp/servers/<uuid:server_id>/tools/approve/", api.ServerToolsApprove.as_view(),
         name="external_mcp-server-tools-approve"),
    path("api/v1/external-mcp/servers/<uuid:server_id>/tools/disable/", api.ServerToolsSwitch.as_view(),
         name="external_mcp-server-tools-disable"),
    path("api/v1/external-mcp/servers/<uuid:server_id>/tools/enable/", api.ServerToolsEnable.as_view(),
         name="external_mcp-server-tools-enable"),
    path("api/v1/external-mcp/toolsets/", api.ToolsetListCreate.as_view(), name="external_mcp-toolsets"),
    path("api/v1/external-mcp/toolsets/<uuid:toolset_id>/", api.ToolsetDetail.as_view(), name="external_mcp-toolset"),
    path("api/v1/external-mcp/<uuid:server_id>/mcp", api.ProxyEndpoint.as_view(), name="external_mcp-proxy"),
    path("api/v1/external-mcp/servers/<uuid:server_id>/checks/", api.ServerChecks.as_view(),
         name="external_mcp-server-checks"),
]
