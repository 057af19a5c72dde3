"""Usage export destinations: the only writer of ``ExportDestination``, and the sink of each.

A destination's *shape* is what its delivered days look like: kind, target, level and
pseudonymisation. Changing it makes every day already delivered wrong for the new shape, so the
change forgets those deliveries and the scheduler delivers the days again from ``start_day``
(each delivery replaces its day, so nothing is duplicated at the old target either).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from django.conf import settings
from django.core.exceptions import ValidationError
from django.db import transaction
from django.utils import timezone

from external_mcp import crypto
from usage.export_clickhouse import ClickHouseSink
from usage.export_schema import TABLES
from usage.models import DestinationKind, ExportDestination, ExportLevel

if TYPE_CHECKING:
    from usage.export_files import FilesSink

IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,62}")
SHAPE_FIELDS = ("kind", "level", "pseudonymize", "directory", "url", "database", "table")
EDITABLE_FIELDS = ("name", "enabled", "start_day", *SHAPE_FIELDS, "username")


def validate(destination: ExportDestination) -> None:
    """Raise a ValidationError naming each field that does not fit the destination's kind."""
    errors: dict[str, str] = {}
    if destination.kind == DestinationKind.FILES:
        if not destination.directory or not Path(destination.directory).is_absolute():
            errors["directory"] = "Give an absolute directory path for the files."
    elif destination.kind == DestinationKind.CLICKHOUSE:
        parts = urlsplit(destination.url)
        try:
            port_ok = parts.port is None or parts.port > 0
        except ValueError:
            port_ok = False
        if parts.scheme not in ("http", "https") or not parts.hostname or not port_ok:
            errors["url"] = "Give ClickHouse's HTTP interface as http(s)://host[:port]."
        elif parts.path not in ("", "/") or parts.query or parts.username or parts.password:
            errors["url"] = "Give only scheme, host and port; the user and password have their own fields."
        for field in ("database", "table"):
            value = getattr(destination, field)
            if (value or field == "database") and not IDENTIFIER.fullmatch(value or ""):
                errors[field] = "Letters, digits and underscores, not starting with a digit (at most 63)."
    if destination.level not in ExportLevel.values:
        errors["level"] = f"One of: {', '.join(ExportLevel.values)}."
    if errors:
        raise ValidationError(errors)


def destination_save(*, destination: ExportDestination, password: str | None = None) -> ExportDestination:
    """Create or update ``destination``; ``password`` None keeps the stored one, "" removes it."""
    destination.full_clean(exclude=["password_ciphertext", "key_id"])
    validate(destination)
    stored = None if destination._state.adding else ExportDestination.objects.filter(pk=destination.pk).first()
    reshaped = stored is not None and any(getattr(stored, f) != getattr(destination, f) for f in SHAPE_FIELDS)
    with transaction.atomic():
        destination.updated_at = timezone.now()
        destination.save()
        if password is not None:
            destination_set_password(destination=destination, password=password)
        if reshaped:
            destination.deliveries.all().delete()
    return destination


def destination_create(*, password: str = "", **fields: Any) -> ExportDestination:
    return destination_save(destination=ExportDestination(**fields), password=password)


def destination_update(*, destination: ExportDestination, password: str | None = None,
                       **fields: Any) -> ExportDestination:
    unknown = set(fields) - set(EDITABLE_FIELDS)
    if unknown:
        raise ValueError(f"not editable: {', '.join(sorted(unknown))}")
    for field, value in fields.items():
        setattr(destination, field, value)
    return destination_save(destination=destination, password=password)


def destination_set_password(*, destination: ExportDestination, password: str) -> None:
    destination.password_ciphertext = (crypto.encrypt(password.encode(), context=destination.context)
                                       if password else "")
    destination.key_id = crypto.current_key_id() if password else ""
    destination.save(update_fields=["password_ciphertext", "key_id"])


def table_of(destination: ExportDestination) -> str:
    return destination.table or TABLES[destination.level]


def sink_for(destination: ExportDestination) -> FilesSink | ClickHouseSink:
    if destination.kind == DestinationKind.FILES:
        # Imported here: pyarrow adds ~60 MB to a process, and every web worker imports this module
        # (the admin, /metrics); only the worker that writes files needs it.
        from usage.export_files import FilesSink

        return FilesSink(Path(destination.directory), table_of(destination))
    password = (crypto.decrypt(destination.password_ciphertext, context=destination.context).decode()
                if destination.password_ciphertext else "")
    return ClickHouseSink(url=destination.url, database=destination.database, table=table_of(destination),
                          username=destination.username, password=password,
                          timeout=float(settings.USAGE_EXPORT_TIMEOUT_SECONDS))

