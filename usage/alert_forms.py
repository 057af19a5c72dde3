"""The alert rule form of the alerts page: parses input only; the rules themselves are checked by
``usage.alerts``, whose errors land next to the fields they name."""

from __future__ import annotations

from typing import Any

from django import forms

from usage.models import AlertKind


class AlertRuleForm(forms.Form):
    kind = forms.ChoiceField(label="Alert when", choices=AlertKind.choices)
    member = forms.ChoiceField(label="Member", required=False,
                               help_text="Tool calls and quota rules: one member, or any member of the workspace.")
    server = forms.ChoiceField(label="Server", required=False,
                               help_text="Error-rate rules: one server, or each server of the workspace.")
    threshold = forms.IntegerField(
        label="Threshold", required=False, min_value=0,
        help_text="Tool calls in a UTC day (more than this fires), or the error rate in % over the last hour. "
                  "Not used for quota rejections: the first one fires.")
    min_calls = forms.IntegerField(label="Minimum requests in the hour", required=False, min_value=1, initial=20,
                                   help_text="Error-rate rules only: fewer requests never fire.")
    enabled = forms.BooleanField(label="Enabled", required=False, initial=True)

    def __init__(self, *args: Any, members: list[tuple[str, str]], servers: list[tuple[str, str]],
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.fields["member"].choices = [("", "Any member"), *members]
        self.fields["server"].choices = [("", "Any server"), *servers]

    def service_fields(self) -> dict[str, Any]:
        data = self.cleaned_data
        fields = {"kind": data["kind"], "member_id": data["member"] or None, "server_id": data["server"] or None,
                  "threshold": data["threshold"], "enabled": data["enabled"]}
        if data["min_calls"] is not None:
            fields["min_calls"] = data["min_calls"]
        return fields
