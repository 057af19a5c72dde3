"""``manage.py add_export_destination --name N --kind files --directory DIR`` or
``… --kind clickhouse --url http://host:8123 [--database D] [--table T] [--username U] --password-stdin``

Adds a usage export destination (the same as the admin's form, for scripts and ``make run``):
the scheduler then delivers every finalised day from ``--start-day`` (default: yesterday) on.
The password is read from standard input, never from the command line (it would show in ``ps``
and shell history), and stored encrypted.
"""

from __future__ import annotations

import sys
from typing import Any

from django.core.exceptions import ValidationError
from django.core.management.base import BaseCommand, CommandError, CommandParser

from usage.destinations import destination_create
from usage.management.commands._dates import parse_day
from usage.models import DestinationKind, ExportLevel


class Command(BaseCommand):
    help = "Add a usage export destination (files: Parquet + JSON Lines partitions; or ClickHouse)."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--name", required=True)
        parser.add_argument("--kind", required=True, choices=DestinationKind.values)
        parser.add_argument("--level", choices=ExportLevel.values, default=ExportLevel.DAILY)
        parser.add_argument("--no-pseudonymize", action="store_true", help="Keep user ids, usernames and e-mails.")
        parser.add_argument("--start-day", help="The first UTC day to deliver, YYYY-MM-DD (default: yesterday).")
        parser.add_argument("--directory", default="", help="files: an absolute directory.")
        parser.add_argument("--url", default="", help="clickhouse: http(s)://host:port of the HTTP interface.")
        parser.add_argument("--database", default="twinmcp")
        parser.add_argument("--table", default="", help="clickhouse: default usage_daily or usage_events.")
        parser.add_argument("--username", default="")
        parser.add_argument("--password-stdin", action="store_true", help="Read the ClickHouse password from stdin.")

    def handle(self, *args: Any, name: str, kind: str, level: str, no_pseudonymize: bool, start_day: str | None,
               password_stdin: bool, **fields: Any) -> None:
        password = sys.stdin.readline().rstrip("\n") if password_stdin else ""
        extra = {"start_day": parse_day(start_day, "--start-day")} if start_day else {}
        try:
            destination = destination_create(
                name=name, kind=kind, level=level, pseudonymize=not no_pseudonymize, password=password,
                directory=fields["directory"], url=fields["url"], database=fields["database"], table=fields["table"],
                username=fields["username"], **extra)
        except ValidationError as exc:
            problems = "; ".join(f"--{field.replace('_', '-')}: {' '.join(messages)}"
                                 for field, messages in exc.message_dict.items())
            raise CommandError(problems) from None
        self.stdout.write(f"{destination.name}: {destination.kind}, {destination.level}, from "
                          f"{destination.start_day}{'' if destination.pseudonymize else ', with identities'}")
