from __future__ import annotations

from typing import Any

from django import forms
from django.contrib import admin, messages
from django.core.exceptions import ValidationError
from django.db.models import Count, Max, Q, QuerySet
from django.http import HttpRequest

from usage import delivery, destinations
from usage.models import DeliveryState, ExportDelivery, ExportDestination, QuotaCounter


class ReadOnlyAdmin(admin.ModelAdmin):
    """Rows only their service module writes: shown, never added, changed or deleted here."""

    def has_add_permission(self, request: object) -> bool:
        return False

    def has_change_permission(self, request: object, obj: object = None) -> bool:
        return False

    def has_delete_permission(self, request: object, obj: object = None) -> bool:
        return False


@admin.register(QuotaCounter)
class QuotaCounterAdmin(ReadOnlyAdmin):
    """Read-only: counters are written only by the limiter (``usage.limiter``), with conditional updates."""

    list_display = ["user", "day", "used", "updated_at"]
    list_filter = ["day"]
    list_select_related = ["user"]
    search_fields = ["user__username", "user__email"]
    date_hierarchy = "day"
    readonly_fields = ["user", "day", "used", "updated_at"]


class ExportDestinationForm(forms.ModelForm):
    """The password is write-only: never rendered back, encrypted on save (``usage.destinations``)."""

    password = forms.CharField(
        required=False, strip=False, widget=forms.PasswordInput(render_value=False),
        help_text="ClickHouse: stored encrypted and never shown again. Leave empty to keep the current one.")
    clear_password = forms.BooleanField(required=False, help_text="Remove the stored password.")

    class Meta:
        model = ExportDestination
        fields = ["name", "kind", "level", "pseudonymize", "enabled", "start_day", "directory", "url", "database",
                  "table", "username"]

    def _post_clean(self) -> None:
        super()._post_clean()
        try:
            destinations.validate(self.instance)
        except ValidationError as exc:
            self._update_errors(exc)


@admin.register(ExportDestination)
class ExportDestinationAdmin(admin.ModelAdmin):
    form = ExportDestinationForm
    list_display = ["name", "kind", "level", "pseudonymize", "enabled", "start_day", "failing_days", "last_delivery"]
    list_filter = ["kind", "level", "enabled"]
    readonly_fields = ["status", "password_stored"]

    def get_queryset(self, request: HttpRequest) -> QuerySet[ExportDestination]:
        return super().get_queryset(request).annotate(
            n_failing=Count("deliveries", filter=Q(deliveries__state=DeliveryState.FAILED)),
            last_delivered_at=Max("deliveries__delivered_at"))

    @admin.display(description="failing days", ordering="n_failing")
    def failing_days(self, obj: ExportDestination) -> int:
        return obj.n_failing

    @admin.display(description="last delivery", ordering="last_delivered_at")
    def last_delivery(self, obj: ExportDestination) -> Any:
        return obj.last_delivered_at

    @admin.display(description="status")
    def status(self, obj: ExportDestination) -> str:
        if obj.pk is None:
            return "-"
        found = next((s for s in delivery.destinations_status() if s.destination.pk == obj.pk), None)
        if found is None:
            return "-"
        return (f"lag {found.lag_days} day(s); oldest day to deliver: {found.oldest_pending or 'none'}; "
                f"failing days: {found.failing_days}")

    @admin.display(description="password")
    def password_stored(self, obj: ExportDestination) -> str:
        return f"stored, encrypted (key {obj.key_id})" if obj.password_ciphertext else "none"

    def save_model(self, request: HttpRequest, obj: ExportDestination, form: ExportDestinationForm,
                   change: bool) -> None:
        password = "" if form.cleaned_data.get("clear_password") else (form.cleaned_data.get("password") or None)
        destinations.destination_save(destination=obj, password=password)


@admin.register(ExportDelivery)
class ExportDeliveryAdmin(ReadOnlyAdmin):
    """Read-only records written by ``usage.delivery``; "Deliver again" makes days due now."""

    list_display = ["destination", "day", "state", "rows", "attempts", "failures", "delivered_at", "next_attempt_at",
                    "short_error"]
    list_filter = ["state", "destination"]
    list_select_related = ["destination"]
    date_hierarchy = "day"
    actions = ["deliver_again"]
    readonly_fields = [f.name for f in ExportDelivery._meta.fields]

    @admin.display(description="last error")
    def short_error(self, obj: ExportDelivery) -> str:
        return obj.last_error[:120]

    @admin.action(description="Deliver again (replaces the day at the destination)")
    def deliver_again(self, request: HttpRequest, queryset: QuerySet[ExportDelivery]) -> None:
        count = delivery.deliveries_redo(deliveries=list(queryset))
        self.message_user(request, f"{count} day(s) will be delivered again on the next run.", messages.SUCCESS)
