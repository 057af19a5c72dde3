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
]
