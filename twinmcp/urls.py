from django.contrib import admin
from django.contrib.auth import views as auth_views
from django.urls import include, path
from drf_spectacular.views import SpectacularAPIView, SpectacularSwaggerView

from twinmcp import api, audit_views, favicon, member_api, member_views, metrics_view, ui, views

urlpatterns = [
    path("", views.home, name="home"),
    path("healthz", views.healthz, name="healthz"),
    path("accounts/login/", auth_views.LoginView.as_view(), name="login"),
    path("accounts/logout/", auth_views.LogoutView.as_view(), name="logout"),
    path("admin/", admin.site.urls),
    path("api/v1/api-keys/", api.ApiKeyListCreate.as_view(), name="twinmcp-api-keys"),
    path("api/v1/api-keys/<uuid:key_id>/", api.ApiKeyRevoke.as_view(), name="twinmcp-api-key"),
    path("api-keys/", ui.api_keys, name="twinmcp-ui-api-keys"),
    path("api-keys/<uuid:key_id>/revoke/", ui.api_key_revoke, name="twinmcp-ui-api-key-revoke"),
    path("favicon.ico", favicon.favicon, name="twinmcp-favicon"),
    path("members/", member_views.members_home, name="twinmcp-ui-members-home"),
    path("workspaces/<uuid:workspace_id>/members/", member_views.member_list, name="twinmcp-ui-members"),
    path("workspaces/<uuid:workspace_id>/members/add/", member_views.member_add, name="twinmcp-ui-member-add"),
    path("workspaces/<uuid:workspace_id>/members/new/", member_views.member_create, name="twinmcp-ui-member-create"),
    path("workspaces/<uuid:workspace_id>/members/<int:user_id>/role/", member_views.member_role,
         name="twinmcp-ui-member-role"),
    path("workspaces/<uuid:workspace_id>/members/<int:user_id>/remove/", member_views.member_remove,
         name="twinmcp-ui-member-remove"),
    path("api/v1/workspaces/<uuid:workspace_id>/members/", member_api.MemberListCreate.as_view(),
         name="twinmcp-api-members"),
    path("api/v1/workspaces/<uuid:workspace_id>/members/<int:user_id>/", member_api.MemberDetail.as_view(),
         name="twinmcp-api-member"),
    path("audit/", audit_views.audit_list, name="twinmcp-ui-audit"),
    path("api/schema/", SpectacularAPIView.as_view(), name="schema"),
    path("api/docs/", SpectacularSwaggerView.as_view(url_name="schema"), name="swagger-ui"),
    path("", include("external_mcp.urls")),
    path("", include("usage.urls")),
    path("", include("usage.alert_urls")),
    path("", include("external_mcp.ui_urls")),
    path("", include("usage.ui_urls")),
    path("metrics", metrics_view.metrics, name="metrics"),
]

handler400 = "twinmcp.api_errors.handler400"
handler403 = "twinmcp.api_errors.handler403"
handler404 = "twinmcp.api_errors.handler404"
handler500 = "twinmcp.api_errors.handler500"
