"""The playground's form for a tool's arguments, built from the tool's input schema (JSON Schema).

Scalars, enums and arrays of scalars get their own inputs; any property the form cannot render
(an object, a union, an array of objects) gets a JSON textarea of its own, and the whole arguments
object can always be edited as JSON instead. The form only turns inputs into JSON values: whether
the arguments are acceptable is decided by ``jsonschema`` against the tool's own schema, so the
form and the upstream agree on one set of rules.
"""

from __future__ import annotations

import json
from typing import Any

from django import forms
from jsonschema import exceptions as schema_errors
from jsonschema.validators import validator_for

from twinmcp.parsers import JsonTooDeep, loads

SCALARS = ("string", "number", "integer", "boolean")
MODES = (("form", "Form"), ("json", "JSON"))
MAX_FIELDS = 100
"""A schema with more properties than this is edited as JSON only: a page of hundreds of inputs
helps nobody, and the schema is an upstream's, so its size is not ours to trust."""
MAX_LABEL = 200
MAX_HELP = 1000


def _type_of(schema: dict[str, Any]) -> str | None:
    """The one JSON type a property allows (``["string", "null"]`` counts as ``string``)."""
    kind = schema.get("type")
    if isinstance(kind, list):
        kinds = [k for k in kind if k != "null"]
        kind = kinds[0] if len(kinds) == 1 else None
    return kind if isinstance(kind, str) else None


def _enum_of(schema: dict[str, Any]) -> list[Any] | None:
    values = schema.get("enum")
    if "const" in schema and values is None:
        values = [schema["const"]]
    if isinstance(values, list) and values and all(v is None or isinstance(v, str | int | float | bool)
                                                   for v in values):
        return values
    return None


def _shown(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


class ScalarListField(forms.CharField):
    """An array of strings, numbers or integers, one item a line."""

    widget = forms.Textarea

    def __init__(self, *, item_type: str, **kwargs: Any) -> None:
        self.item_type = item_type
        super().__init__(**kwargs)
        self.widget.attrs.update({"rows": 3, "spellcheck": "false"})

    def prepare_value(self, value: Any) -> Any:
        if isinstance(value, list):
            return "\n".join(_shown(item) for item in value)
        return value

    def to_python(self, value: Any) -> list[Any] | None:
        text = super().to_python(value)
        if not text:
            return None
        items: list[Any] = []
        for number, line in enumerate(text.splitlines(), start=1):
            item = line.strip()
            if not item:
                continue
            if self.item_type == "string":
                items.append(item)
                continue
            try:
                items.append(int(item) if self.item_type == "integer" else float(item))
            except ValueError:
                kind = "an integer" if self.item_type == "integer" else "a number"
                raise forms.ValidationError(f"Line {number}: {item[:50]!r} is not {kind}.") from None
        return items


class AlwaysSentCheckbox(forms.CheckboxInput):
    def use_required_attribute(self, initial: Any) -> bool:
        return False  # unchecked is an answer too (false), not a missing one


class RequiredBooleanField(forms.BooleanField):
    """A required boolean: marked required, always sent, ``false`` when unchecked."""

    widget = AlwaysSentCheckbox

    def validate(self, value: Any) -> None:
        return None


class JSONValueField(forms.CharField):
    """Any JSON value, typed as JSON (what the form cannot render), depth-limited like every JSON input."""

    widget = forms.Textarea

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.widget.attrs.update({"rows": 4, "spellcheck": "false", "class": "code"})

    def to_python(self, value: Any) -> Any:
        text = super().to_python(value)
        if not text:
            return None
        try:
            return loads(text)
        except JsonTooDeep as exc:
            raise forms.ValidationError(str(exc)) from None
        except ValueError as exc:
            raise forms.ValidationError(f"Not valid JSON: {exc}.") from None


def field_for(name: str, schema: Any, *, required: bool) -> forms.Field:
    """The input for one property of the arguments object."""
    schema = schema if isinstance(schema, dict) else {}
    description = schema.get("description")
    title = schema.get("title")
    if isinstance(title, str) and title.lower().replace(" ", "_") == name.lower():
        title = None  # a title generated from the name (pydantic's "Label" for label) repeats the label
    help_parts = [p for p in (title, description) if isinstance(p, str) and p]
    common: dict[str, Any] = {"label": name[:MAX_LABEL], "required": required,
                              "help_text": " — ".join(help_parts)[:MAX_HELP]}
    default = schema.get("default")
    enum = _enum_of(schema)
    kind = _type_of(schema)
    if enum is not None:
        choices = [(_shown(v), _shown(v)) for v in enum]
        by_text = {_shown(v): v for v in enum}
        blank = [] if required and default is not None else [("", "—")]
        return forms.TypedChoiceField(choices=blank + choices, coerce=by_text.__getitem__, empty_value=None,
                                      initial=_shown(default) if default is not None else None, **common)
    if kind == "boolean":
        if required:
            return RequiredBooleanField(initial=default is True, **common)
        return forms.NullBooleanField(initial=default if isinstance(default, bool) else None,
                                      widget=forms.Select(choices=[("unknown", "— (not sent)"), ("true", "Yes"),
                                                                   ("false", "No")]), **common)
    if kind == "integer":
        return forms.IntegerField(initial=default if isinstance(default, int) else None, **common)
    if kind == "number":
        return forms.FloatField(initial=default if isinstance(default, int | float) else None, **common)
    if kind == "string":
        return forms.CharField(initial=default if isinstance(default, str) else None, strip=False,
                               empty_value=None, **common)
    items = schema.get("items")
    if kind == "array" and isinstance(items, dict):
        item_enum = _enum_of(items)
        if item_enum is not None:
            by_text = {_shown(v): v for v in item_enum}
            return forms.TypedMultipleChoiceField(
                choices=[(key, key) for key in by_text], coerce=by_text.__getitem__, empty_value=None,
                widget=forms.CheckboxSelectMultiple,
                initial=[_shown(v) for v in default] if isinstance(default, list) else None, **common)
        item_type = _type_of(items)
        if item_type in ("string", "number", "integer"):
            return ScalarListField(item_type=item_type, initial=default if isinstance(default, list) else None,
                                   **common)
    field = JSONValueField(initial=None if default is None else json.dumps(default, indent=2), **common)
    field.help_text = ((field.help_text + " ") if field.help_text else "") + "Enter this value as JSON."
    return field


class ArgumentsForm(forms.Form):
    """The arguments of one tool call: a field per property (``arg:`` prefixed, so a property
    named like a form control cannot shadow it), or the whole object as JSON."""

    schema_problem: str = ""
    """Set when the tool's schema could not be applied: the arguments go unchecked, and the page says so."""
    arguments: dict[str, Any]
    """The arguments to send, once the form is valid."""

    mode = forms.ChoiceField(choices=MODES, initial="form", widget=forms.HiddenInput)
    arguments_json = JSONValueField(required=False, label="Arguments (JSON)",
                                    help_text="The whole arguments object, as the agent would send it.")

    def __init__(self, schema: Any, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.schema = schema if isinstance(schema, dict) else {}
        properties = self.schema.get("properties")
        required = self.schema.get("required")
        required_names = {n for n in required if isinstance(n, str)} if isinstance(required, list) else set()
        self.names: dict[str, str] = {}
        if isinstance(properties, dict) and len(properties) <= MAX_FIELDS:
            # Stored as jsonb, the schema has lost the upstream's property order: required first, then by name.
            ordered = sorted(properties.items(), key=lambda item: (item[0] not in required_names, item[0]))
            for number, (name, spec) in enumerate(ordered):
                key = f"arg{number}"
                self.names[key] = name
                self.fields[key] = field_for(name, spec, required=name in required_names)
        if not self.names and not self.is_bound:
            self.initial["mode"] = "json"
        defaults = {name: spec["default"] for name, spec in properties.items()
                    if isinstance(spec, dict) and "default" in spec} if isinstance(properties, dict) else {}
        self.fields["arguments_json"].initial = json.dumps(defaults, indent=2)

    @property
    def json_mode(self) -> bool:
        return self["mode"].value() == "json"

    def argument_fields(self) -> list[forms.BoundField]:
        return [self[key] for key in self.names]

    def full_clean(self) -> None:
        if self.is_bound and self.data.get("mode") == "json":
            for key in self.names:
                self.fields[key].required = False  # the JSON object is what is sent; its rules apply to it
        super().full_clean()

    def clean(self) -> dict[str, Any]:
        cleaned = super().clean()
        if cleaned.get("mode") == "json":
            if "arguments_json" in self.errors:
                return cleaned
            arguments = cleaned.get("arguments_json")
            if arguments is None:
                arguments = {}
            if not isinstance(arguments, dict):
                self.add_error("arguments_json", "The arguments must be a JSON object.")
                return cleaned
        else:
            arguments = {}
            for key, name in self.names.items():
                value = cleaned.get(key)
                if value is None or value == [] and not self.fields[key].required:
                    continue
                arguments[name] = value
        self.arguments = arguments
        self._check_schema(arguments, json_mode=cleaned.get("mode") == "json")
        return cleaned

    def _check_schema(self, arguments: dict[str, Any], *, json_mode: bool) -> None:
        """The tool's own rules, each failure on the input it concerns."""
        try:
            validator_cls = validator_for(self.schema)
            validator_cls.check_schema(self.schema)
            failures = sorted(validator_cls(self.schema).iter_errors(arguments), key=lambda e: [str(p) for p in e.path])
        except schema_errors.SchemaError:
            self.schema_problem = "The tool's input schema is not valid JSON Schema: the arguments were not checked."
            return
        except Exception as exc:  # noqa: BLE001 - an upstream's schema (unresolvable $ref, bad pattern) is no 500
            self.schema_problem = f"The tool's input schema could not be applied ({type(exc).__name__})."
            return
        keys = {name: key for key, name in self.names.items()}
        required = self.schema.get("required") if isinstance(self.schema.get("required"), list) else []
        missing = iter([n for n in required if isinstance(n, str) and n not in arguments])
        for failure in failures[:50]:
            name = failure.path[0] if failure.path else None
            message = failure.message[:300]
            if name is None and failure.validator == "required":
                name, message = next(missing, None), "This field is required."
            if not json_mode and isinstance(name, str) and name in keys:
                if keys[name] not in self.errors:  # else the input's own error says more
                    self.add_error(keys[name], message)
                continue
            where = "/".join([str(p) for p in failure.path] or ([name] if isinstance(name, str) else []))
            self.add_error("arguments_json" if json_mode else None, f"{where}: {message}" if where else message)
