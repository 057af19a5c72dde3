from django.contrib import admin
from waffle.admin import FlagAdmin as WaffleFlagAdmin
from waffle.models import Flag

from twinmcp.models import ApiKey, FlagWorkspace, Membership, Plan, Profile, Workspace


class MembershipInline(admin.TabularInline):
    model = Membership
    extra = 0
    autocomplete_fields = ["user"]


@admin.register(Workspace)
class WorkspaceAdmin(admin.ModelAdmin):
    list_display = ["slug", "name", "created_at"]
    search_fields = ["slug", "name"]
    inlines = [MembershipInline]


@admin.register(Membership)
class MembershipAdmin(admin.ModelAdmin):
    list_display = ["user", "workspace", "role", "created_at"]
    list_filter = ["role"]
    list_select_related = ["user", "workspace"]


@admin.register(Plan)
class PlanAdmin(admin.ModelAdmin):
    list_display = ["code", "name", "capped", "daily_limit"]


@admin.register(Profile)
class ProfileAdmin(admin.ModelAdmin):
    list_display = ["user", "plan", "timezone"]
    list_filter = ["plan"]
    list_select_related = ["user", "plan"]


@admin.register(ApiKey)
class ApiKeyAdmin(admin.ModelAdmin):
    """The hash is never shown: the prefix is enough to recognise a key."""

    list_display = ["prefix", "name", "user", "workspace", "created_at", "last_used_at", "expires_at", "revoked_at"]
    list_select_related = ["user", "workspace"]
    exclude = ["key_hash"]
    readonly_fields = ["prefix", "user", "workspace", "created_at", "last_used_at"]

    def has_add_permission(self, request: object) -> bool:
        return False


class FlagWorkspaceInline(admin.TabularInline):
    model = FlagWorkspace
    extra = 1
    verbose_name = "workspace with this flag on"
    verbose_name_plural = "workspaces with this flag on"


admin.site.unregister(Flag)


@admin.register(Flag)
class FlagAdmin(WaffleFlagAdmin):
    inlines = [*WaffleFlagAdmin.inlines, FlagWorkspaceInline]
