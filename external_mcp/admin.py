"""Django admin for the registry: metadata only, the ciphertext is never shown or editable."""

from __future__ import annotations

from django.contrib import admin
from django.http import HttpRequest
from django.utils import timezone

from external_mcp import staleness
from external_mcp.choices import ServerStatus
from external_mcp.models import AuditEvent, ExternalMcpCredential, ExternalMcpServer, Notification, ServerQuerySet


class CredentialInline(admin.StackedInline):
    model = ExternalMcpCredential
    can_delete = False
    extra = 0
    exclude = ["ciphertext"]
    readonly_fields = ["key_id", "fingerprint", "created_at", "rotated_at", "expires_at", "cert_subject",
                       "cert_issuer", "cert_not_after"]

    def has_add_permission(self, request: HttpRequest, obj: object = None) -> bool:
        return False


class ShownStatusFilter(admin.SimpleListFilter):
    """The status the UI and API show: a stored status whose checks stopped is shown as stale."""

    title = "status"
    parameter_name = "status"

    def lookups(self, request: HttpRequest, model_admin: admin.ModelAdmin) -> list[tuple[str, str]]:
        return list(ServerStatus.choices)

    def queryset(self, request: HttpRequest, queryset: ServerQuerySet) -> ServerQuerySet | None:
        value = self.value()
        return queryset.shown_as(value, timezone.now()) if value else None


@admin.register(ExternalMcpServer)
class ServerAdmin(admin.ModelAdmin):
    """Read-mostly: writes must go through the API or UI so they are validated and audited."""

    list_display = ["name", "workspace", "shown_status", "auth_type", "enabled", "last_checked_at",
                    "last_latency_ms"]
    list_filter = [ShownStatusFilter, "auth_type", "enabled"]
    list_select_related = ["workspace"]
    search_fields = ["name", "description"]
    readonly_fields = [f.name for f in ExternalMcpServer._meta.fields]
    inlines = [CredentialInline]

    @admin.display(description="status")
    def shown_status(self, obj: ExternalMcpServer) -> str:
        return ServerStatus(staleness.shown_status(obj)).label

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: object = None) -> bool:
        return False


@admin.register(AuditEvent)
class AuditEventAdmin(admin.ModelAdmin):
    list_display = ["at", "action", "server_name", "actor", "workspace"]
    list_filter = ["action"]
    list_select_related = ["actor", "workspace"]
    readonly_fields = ["workspace", "server", "server_name", "actor", "action", "changes", "at"]

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: object = None) -> bool:
        return False


@admin.register(Notification)
class NotificationAdmin(admin.ModelAdmin):
    """Read-only: shows whether each notification's e-mail went out, and why not."""

    list_display = ["created_at", "title", "user", "kind", "email_sent_at", "email_attempts",
                    "email_next_attempt_at", "email_error"]
    list_filter = ["kind", ("email_sent_at", admin.EmptyFieldListFilter)]
    list_select_related = ["user"]
    search_fields = ["title", "email_last_error"]
    readonly_fields = [f.name for f in Notification._meta.fields]

    @admin.display(description="last e-mail error")
    def email_error(self, obj: Notification) -> str:
        return obj.email_last_error[:120]

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: object = None) -> bool:
        return False
