from django.contrib import admin

from usage.models import QuotaCounter


@admin.register(QuotaCounter)
class QuotaCounterAdmin(admin.ModelAdmin):
    """Read-only: counters are written only by the limiter (``usage.limiter``), with conditional updates."""

    list_display = ["user", "day", "used", "updated_at"]
    list_filter = ["day"]
    list_select_related = ["user"]
    search_fields = ["user__username", "user__email"]
    date_hierarchy = "day"
    readonly_fields = ["user", "day", "used", "updated_at"]

    def has_add_permission(self, request: object) -> bool:
        return False

    def has_change_permission(self, request: object, obj: object = None) -> bool:
        return False

    def has_delete_permission(self, request: object, obj: object = None) -> bool:
        return False
