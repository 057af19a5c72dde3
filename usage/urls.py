from django.urls import path

from usage import api

urlpatterns = [
    path("api/v1/external-mcp/usage", api.UsageList.as_view(), name="usage-list"),
    path("api/v1/external-mcp/usage/", api.UsageListSlash.as_view(), name="usage-list-slash"),
    path("api/v1/external-mcp/usage/export", api.UsageExport.as_view(), name="usage-export"),
    path("api/v1/external-mcp/usage/export/", api.UsageExportSlash.as_view(), name="usage-export-slash"),
    path("api/v1/usage/quota", api.QuotaStatus.as_view(), name="usage-quota"),
    path("api/v1/usage/quota/", api.QuotaStatusSlash.as_view(), name="usage-quota-slash"),
    path("api/v1/usage/quota/members", api.QuotaMembers.as_view(), name="usage-quota-members"),
]
