"""Forms of the admin pages. They only shape input: every rule lives in ``external_mcp.services``,
whose ``ValidationError`` keys (``base_url``, ``credentials.token``…) are put back next to the
field they name by :func:`apply_service_errors`.

Secrets are write-only: no credential input ever renders a value, not even after a failed submit.
"""

from __future__ import annotations

from datetime import UTC, datetime, time
from typing import Any

from django import forms
from django.core.exceptions import ValidationError

from external_mcp import pem_checks
from external_mcp.choices import AuthType, CredentialMode, PrefixMode, ServerStatus, Transport
from external_mcp.credentials import MAX_PEM_BYTES
from external_mcp.exposed_names import PREFIX_MAX_CHARS

CREDENTIALS_PREFIX = "cred"
KEPT_FIELD = "kept"


class WriteOnlyTextInput(forms.TextInput):
    """A text input that, like ``PasswordInput``, never renders its value back."""

    def get_context(self, name: str, value: Any, attrs: dict | None) -> dict:
        return super().get_context(name, None, attrs)


def _secret(label: str, help_text: str = "") -> forms.CharField:
    return forms.CharField(
        label=label, required=False, strip=False, help_text=help_text,
        widget=forms.PasswordInput(render_value=False, attrs={"autocomplete": "new-password", "spellcheck": "false"}),
    )


class ServerFilterForm(forms.Form):
    status = forms.ChoiceField(label="Status", required=False,
                               choices=[("", "Any status"), *ServerStatus.choices])
    tag = forms.CharField(label="Tag", required=False, max_length=40,
                          widget=forms.TextInput(attrs={"list": "known-tags", "autocomplete": "off"}))
    search = forms.CharField(label="Search", required=False, max_length=100,
                             widget=forms.TextInput(attrs={"type": "search", "placeholder": "Name or description"}))


class ServerForm(forms.Form):
    """The General section, plus the auth type that decides which credential form applies."""

    workspace = forms.ChoiceField(label="Workspace", required=True)
    name = forms.CharField(label="Name", max_length=100)
    prefix = forms.CharField(
        label="Tool prefix", max_length=PREFIX_MAX_CHARS, required=False,
        help_text="Where several servers meet, its tools are named <prefix>__<tool>. Lowercase letters and digits, "
                  "joined by single - or _. Leave empty to derive it from the name.",
        widget=forms.TextInput(attrs={"spellcheck": "false", "autocapitalize": "off"}),
    )
    base_url = forms.CharField(
        label="MCP endpoint URL", max_length=2048,
        help_text="The server's MCP endpoint, e.g. https://mcp.example.com/mcp (or, for an HTTP+SSE server, its "
                  "event stream, e.g. https://mcp.example.com/sse)",
        widget=forms.URLInput(attrs={"placeholder": "https://mcp.example.com/mcp", "spellcheck": "false"}),
    )
    transport = forms.ChoiceField(
        label="Transport", choices=Transport.choices, initial=Transport.AUTO, required=False,
        help_text="Automatic tries Streamable HTTP, then the older HTTP+SSE transport if the URL refuses a POST, "
                  "and remembers what answered.")
    description = forms.CharField(label="Description", required=False, max_length=2000,
                                  widget=forms.Textarea(attrs={"rows": 3}))
    tags = forms.CharField(label="Tags", required=False, max_length=1000,
                           help_text="Comma-separated, e.g. crm, production")
    auth_type = forms.ChoiceField(label="Authentication type", choices=AuthType.choices,
                                  initial=AuthType.NONE)
    credential_mode = forms.ChoiceField(
        label="Whose credentials", choices=CredentialMode.choices, initial=CredentialMode.SHARED, required=False,
        widget=forms.RadioSelect,
        help_text="Shared: the secret (or the OAuth account an admin connects) serves every member. Each member's "
                  "own: members connect their own account or enter their own secret on the server's page, and "
                  "the upstream sees who calls.")

    def __init__(self, *args: Any, workspaces: list | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        workspaces = workspaces or []
        if len(workspaces) > 1:
            self.fields["workspace"].choices = [(str(w.pk), w.name) for w in workspaces]
        else:
            # One workspace (or an edit, where the workspace cannot change): no choice to make.
            del self.fields["workspace"]
        self.workspaces = {str(w.pk): w for w in workspaces}

    def chosen_workspace(self) -> Any:
        if "workspace" in self.fields:
            return self.workspaces[self.cleaned_data["workspace"]]
        return next(iter(self.workspaces.values()))

    def service_fields(self) -> dict[str, Any]:
        data = self.cleaned_data
        return {
            "name": data["name"], "base_url": data["base_url"], "description": data["description"],
            "transport": data["transport"] or Transport.AUTO,
            "tags": [t.strip() for t in data["tags"].split(",") if t.strip()],
            **({"prefix": data["prefix"]} if data["prefix"] else {}),
        }

    @property
    def members_enter_secrets(self) -> bool:
        """Per-user credentials of a type with a secret: the server itself stores none."""
        data = self.cleaned_data
        return data.get("credential_mode") == CredentialMode.PER_USER and data.get("auth_type") != AuthType.OAUTH2


class CredentialsForm(forms.Form):
    """Base of the per-auth-type credential forms; fields are named like the payload keys."""

    auth_type: str = AuthType.NONE
    # Names of fields that are not secret and may be shown again.
    public_fields: tuple[str, ...] = ()

    expires_at = forms.DateField(
        label="Secret expires on (optional)", required=False,
        help_text="When the upstream will stop accepting this secret; used for reminders only.",
        widget=forms.DateInput(attrs={"type": "date"}),
    )

    def __init__(self, *args: Any, owner: Any = None, **kwargs: Any) -> None:
        kwargs.setdefault("prefix", CREDENTIALS_PREFIX)
        super().__init__(*args, **kwargs)
        # The user whose re-rendered form may carry back what they uploaded (see MtlsCredentialsForm).
        self.owner = owner

    def payload_fields(self) -> list[str]:
        return [name for name in self.fields if name != "expires_at"]

    def payload(self, *, new: bool = False) -> dict[str, str] | None:
        """The non-empty values typed. For ``new`` credentials (a new server, a new auth type) always a
        dict, so the service names each missing field; otherwise None when no secret was typed
        (the stored credentials stay as they are) and no public field (header name) was changed."""
        values = {name: self.cleaned_data.get(name) for name in self.payload_fields()}
        values = {name: value for name, value in values.items() if value not in (None, "")}
        if new:
            return values
        changed = any(name not in self.public_fields
                      or value != self.initial.get(name, self.fields[name].initial) for name, value in values.items())
        return values if changed else None

    def expires_at_value(self) -> datetime | None:
        day = self.cleaned_data.get("expires_at")
        return datetime.combine(day, time.min, tzinfo=UTC) if day else None


class NoCredentialsForm(CredentialsForm):
    auth_type = AuthType.NONE

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        del self.fields["expires_at"]

    def payload(self, *, new: bool = False) -> None:
        return None


class ApiKeyCredentialsForm(CredentialsForm):
    auth_type = AuthType.API_KEY
    public_fields = ("header",)

    header = forms.CharField(label="Header name", required=False, max_length=100, initial="X-API-Key",
                             help_text="The HTTP header the server reads the key from.")
    value = _secret("API key")


class BasicCredentialsForm(CredentialsForm):
    auth_type = AuthType.BASIC

    username = forms.CharField(label="Username", required=False, strip=False,
                               widget=WriteOnlyTextInput(attrs={"autocomplete": "off", "spellcheck": "false"}))
    password = _secret("Password")


class BearerCredentialsForm(CredentialsForm):
    auth_type = AuthType.BEARER

    token = _secret("Bearer token")


class PemFileField(forms.FileField):
    """An uploaded PEM file, returned as text (the service checks what it contains)."""

    def clean(self, data: Any, initial: Any = None) -> str | None:
        upload = super().clean(data, initial)
        if not upload:
            return None
        raw = upload.read(MAX_PEM_BYTES + 1)
        if len(raw) > MAX_PEM_BYTES:
            raise ValidationError(f"Larger than {MAX_PEM_BYTES // 1024} KiB.")
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise ValidationError("Not a PEM text file (upload the .pem/.crt/.key file, not DER).") from None


class WriteOnlyTextarea(forms.Textarea):
    """A textarea that never renders its value back: a pasted private key stays out of the page."""

    def get_context(self, name: str, value: Any, attrs: dict | None) -> dict:
        return super().get_context(name, None, attrs)


def _pem_text(label: str) -> forms.CharField:
    return forms.CharField(
        label=label, required=False, max_length=MAX_PEM_BYTES,
        widget=WriteOnlyTextarea(attrs={"rows": 3, "spellcheck": "false", "autocomplete": "off",
                                        "class": "pem", "placeholder": "-----BEGIN …-----"}))


class MtlsCredentialsForm(CredentialsForm):
    """Each PEM comes as a file or pasted text. Every part is checked and every problem reported at
    once; the parts that passed are kept across the re-render, encrypted for this user only and for
    a short while, so a fix needs only the part that was wrong."""

    auth_type = AuthType.MTLS
    public_fields = ("ca_bundle_pem",)

    client_cert_pem = PemFileField(label="Client certificate (PEM)", required=False,
                                   widget=forms.ClearableFileInput(attrs={"accept": ".pem,.crt,.cer"}))
    client_cert_pem_text = _pem_text("…or paste the certificate")
    client_key_pem = PemFileField(label="Client private key (PEM, unencrypted)", required=False,
                                  widget=forms.ClearableFileInput(attrs={"accept": ".pem,.key"}))
    client_key_pem_text = _pem_text("…or paste the private key")
    ca_bundle_pem = PemFileField(label="CA bundle to trust (PEM, optional)", required=False,
                                 widget=forms.ClearableFileInput(attrs={"accept": ".pem,.crt"}))
    ca_bundle_pem_text = _pem_text("…or paste the CA bundle")

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.kept_token = ""

    @property
    def kept_name(self) -> str:
        return self.add_prefix(KEPT_FIELD)

    def payload_fields(self) -> list[str]:
        return list(pem_checks.PARTS)

    def clean(self) -> dict[str, Any]:
        data = super().clean()
        kept = self._kept()
        given: dict[str, pem_checks.Pem] = {}
        for part in pem_checks.PARTS:
            if part in self.errors:
                continue
            upload, pasted = data.get(part), data.get(f"{part}_text")
            if upload and pasted:
                self.add_error(f"{part}_text", "Upload a file or paste the PEM, not both.")
            elif upload:
                given[part] = pem_checks.Pem(text=upload, name=getattr(self.files.get(self.add_prefix(part)),
                                                                        "name", "uploaded file"))
            elif pasted:
                given[part] = pem_checks.Pem(text=pasted, name=pem_checks.PASTED[part])
            elif part in kept:
                given[part] = kept[part]
        problems = pem_checks.problems(given)
        for part, message in problems.items():
            self.add_error(part, message)
        good = {part: pem for part, pem in given.items() if part not in problems}
        for part, pem in good.items():
            data[part] = pem.text
        if self.owner is not None and good:
            self.kept_token = pem_checks.keep(good, owner=self.owner)
            for part, pem in good.items():
                # The bound field copied the help text when cleaning began.
                self[part].help_text = f"{pem.name} kept — choose another file to replace it."
        return data

    def _kept(self) -> dict[str, pem_checks.Pem]:
        token = self.data.get(self.kept_name) if self.owner is not None else None
        return pem_checks.kept(token, owner=self.owner) if token else {}


class OAuthClientCredentialsForm(CredentialsForm):
    auth_type = AuthType.OAUTH2_CLIENT_CREDENTIALS

    client_id = forms.CharField(label="Client ID", required=False, max_length=1000,
                                widget=WriteOnlyTextInput(attrs={"autocomplete": "off", "spellcheck": "false"}))
    client_secret = _secret("Client secret")
    token_url = forms.CharField(label="Token URL (optional)", required=False, max_length=2048,
                                help_text="Left empty, TwinMCP finds it from the server (RFC 9728, then RFC 8414).",
                                widget=WriteOnlyTextInput(attrs={"autocomplete": "off", "spellcheck": "false"}))
    scope = forms.CharField(label="Scopes (optional)", required=False, max_length=1000,
                            help_text="Space-separated, as the authorization server names them.",
                            widget=WriteOnlyTextInput(attrs={"autocomplete": "off", "spellcheck": "false"}))


class OAuthCredentialsForm(CredentialsForm):
    """The client TwinMCP is at the authorization server, if one was registered for it by hand."""

    auth_type = AuthType.OAUTH2
    public_fields = ("client_id", "scopes")

    client_id = forms.CharField(label="Client ID (optional)", required=False, max_length=1000,
                                help_text="Leave empty: TwinMCP registers itself at the authorization server "
                                          "(dynamic client registration) when you connect.",
                                widget=forms.TextInput(attrs={"autocomplete": "off", "spellcheck": "false"}))
    client_secret = _secret("Client secret (optional)")
    scopes = forms.CharField(label="Scopes (optional)", required=False, max_length=1000,
                             help_text="Space-separated. Left empty: what the server asks for.",
                             widget=forms.TextInput(attrs={"autocomplete": "off", "spellcheck": "false"}))


CREDENTIAL_FORMS: dict[str, type[CredentialsForm]] = {
    AuthType.NONE: NoCredentialsForm,
    AuthType.API_KEY: ApiKeyCredentialsForm,
    AuthType.BASIC: BasicCredentialsForm,
    AuthType.BEARER: BearerCredentialsForm,
    AuthType.MTLS: MtlsCredentialsForm,
    AuthType.OAUTH2_CLIENT_CREDENTIALS: OAuthClientCredentialsForm,
    AuthType.OAUTH2: OAuthCredentialsForm,
}


def credentials_form(auth_type: str | None, *args: Any, **kwargs: Any) -> CredentialsForm:
    form_class = CREDENTIAL_FORMS.get(auth_type or AuthType.NONE, NoCredentialsForm)
    return form_class(*args, **kwargs)


def own_credentials_form(server: Any, data: Any = None, files: Any = None) -> CredentialsForm | None:
    """The form a member enters their own secret in, on a per-user server (None on others)."""
    if not server.per_user or server.auth_type in (AuthType.NONE, AuthType.OAUTH2):
        return None
    form = credentials_form(server.auth_type, data, files, prefix="own")
    form.fields.pop("expires_at", None)
    return form


def apply_service_errors(exc: ValidationError, *forms_: forms.Form) -> None:
    """Put a service's ``ValidationError`` next to the fields it names.

    ``credentials.<field>`` goes to the credential form's field, ``credentials`` to its top; a
    key no form has goes to the first form's top, prefixed with the key so it stays readable."""
    messages = exc.message_dict if hasattr(exc, "error_dict") else {"__all__": exc.messages}
    main = forms_[0]
    creds = next((f for f in forms_ if isinstance(f, CredentialsForm)), None)
    for key, errors in messages.items():
        for error in errors:
            if key.startswith("credentials.") and creds is not None:
                name = key.split(".", 1)[1]
                if name in creds.fields:
                    creds.add_error(name, error)
                else:
                    creds.add_error(None, f"{name}: {error}")
            elif key in ("credentials", "credentials_expires_at") and creds is not None:
                creds.add_error(None, error)
            else:
                target = next((f for f in forms_ if key in f.fields), None)
                if target is not None:
                    target.add_error(key, error)
                elif key in ("__all__", "non_field_errors"):
                    main.add_error(None, error)
                else:
                    main.add_error(None, f"{key}: {error}")


TOOL_VALUE_SEPARATOR = ":"


def tool_value(server_id: Any, name: str) -> str:
    """A tool's checkbox value: its server's id, then its name (a UUID has a fixed length, so any name
    reads back whole, colons included)."""
    return f"{server_id}{TOOL_VALUE_SEPARATOR}{name}"


def tool_ref(value: str) -> dict[str, str]:
    return {"server": value[:36], "name": value[37:]}


class ToolsetForm(forms.Form):
    """Name, naming mode and members. The members offered are one workspace's (``servers``:
    ``[(id, label)]``, ``tools``: ``[(tool_value, label)]``); the template groups the tools by server."""

    workspace = forms.ChoiceField(label="Workspace", required=True)
    name = forms.CharField(label="Name", max_length=100)
    description = forms.CharField(label="Description", required=False, max_length=2000,
                                  widget=forms.Textarea(attrs={"rows": 2}))
    prefix_mode = forms.ChoiceField(
        label="Tool names", choices=PrefixMode.choices, initial=PrefixMode.ALWAYS, widget=forms.RadioSelect,
        help_text="Always prefixed: <prefix>__<tool>, never ambiguous. Never prefixed: the servers' own names, "
                  "allowed only while no two members have a tool of the same name.")
    servers = forms.MultipleChoiceField(label="Whole servers", required=False)
    tools = forms.MultipleChoiceField(label="Single tools", required=False)

    def __init__(self, *args: Any, workspaces: list | None = None, servers: list[tuple[str, str]] | None = None,
                 tools: list[tuple[str, str]] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        workspaces = workspaces or []
        if len(workspaces) > 1:
            # Chosen on the page before the form (the members offered depend on it): carried, not shown.
            self.fields["workspace"].choices = [(str(w.pk), w.name) for w in workspaces]
            self.fields["workspace"].widget = forms.HiddenInput()
        else:
            del self.fields["workspace"]
        self.fields["servers"].choices = servers or []
        self.fields["tools"].choices = tools or []

    def service_fields(self) -> dict[str, Any]:
        data = self.cleaned_data
        return {"name": data["name"], "description": data["description"], "prefix_mode": data["prefix_mode"],
                "servers": list(data["servers"]), "tools": [tool_ref(value) for value in data["tools"]]}
