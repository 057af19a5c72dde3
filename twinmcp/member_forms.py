"""Forms of the members page. They only shape input: the rules (unique names, password strength,
the last admin) live in ``twinmcp.members``, whose errors land next to these fields."""

from __future__ import annotations

from django import forms

from twinmcp.models import Role


class MemberAddForm(forms.Form):
    prefix = "add"

    user = forms.CharField(label="Username or e-mail", max_length=254,
                           widget=forms.TextInput(attrs={"autocomplete": "off", "spellcheck": "false",
                                                         "autocapitalize": "off"}))
    role = forms.ChoiceField(label="Role", choices=Role.choices, initial=Role.MEMBER)


class MemberCreateForm(forms.Form):
    prefix = "new"

    username = forms.CharField(label="Username", max_length=150,
                               widget=forms.TextInput(attrs={"autocomplete": "off", "spellcheck": "false",
                                                             "autocapitalize": "off"}))
    email = forms.EmailField(label="E-mail", required=False)
    password = forms.CharField(
        label="Initial password", required=False, strip=False,
        widget=forms.PasswordInput(attrs={"autocomplete": "new-password"}),
        help_text="Leave empty to generate one, shown to you once.",
    )
    role = forms.ChoiceField(label="Role", choices=Role.choices, initial=Role.MEMBER)


class MemberRoleForm(forms.Form):
    role = forms.ChoiceField(label="Role", choices=Role.choices)
