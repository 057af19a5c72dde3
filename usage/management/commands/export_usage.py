"""``manage.py export_usage --day D | --since D --out DIR [--format csv|jsonl|both] [--no-pseudonymize]``

Writes finalised daily usage buckets (one row per workspace, user, server and tool) for loaders
such as BigQuery (``bq load --source_format=NEWLINE_DELIMITED_JSON`` / ``CSV --skip_leading_rows=1``)
or ClickHouse (``FORMAT JSONEachRow`` / ``CSVWithNames``): one file per day and format, named
``usage-YYYY-MM-DD.csv`` / ``.jsonl``, written atomically (temporary file, then rename).
User identities are pseudonymised (per-workspace keyed HMAC) unless ``--no-pseudonymize``.
Days that are not finalised yet are skipped with a warning: their figures would still change.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db.models import Q
from django.utils import timezone

from twinmcp.models import Workspace
from usage import exports
from usage.management.commands._dates import day_range
from usage.queries import GROUP_DIMENSIONS, UsageQuery, days_between, settled_days

FORMATS = {"csv": ("csv",), "jsonl": ("jsonl",), "both": ("csv", "jsonl")}


class Command(BaseCommand):
    help = "Write finalised daily usage buckets as CSV and/or JSON Lines files, one per day (pseudonymised)."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--day", help="One UTC day, YYYY-MM-DD.")
        parser.add_argument("--since", help="Every finalised UTC day from this one (YYYY-MM-DD) on.")
        parser.add_argument("--out", required=True, help="Directory to write to (created if missing).")
        parser.add_argument("--format", dest="fmt", choices=sorted(FORMATS), default="both")
        parser.add_argument("--workspace", help="Only this workspace (slug).")
        parser.add_argument("--no-pseudonymize", action="store_true", help="Keep user ids, usernames and emails.")

    def handle(self, *args: Any, day: str | None, since: str | None, out: str, fmt: str, workspace: str | None,
               no_pseudonymize: bool, **options: Any) -> None:
        today = timezone.now().date()
        span = day_range(day, since, today)
        if span is None:
            raise CommandError("Give --day YYYY-MM-DD or --since YYYY-MM-DD.")
        scope = Q()
        if workspace:
            workspace_id = Workspace.objects.filter(slug=workspace).values_list("pk", flat=True).first()
            if workspace_id is None:
                raise CommandError(f"--workspace: no workspace {workspace!r}.")
            scope = Q(workspace_id=workspace_id)
        directory = Path(out)
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise CommandError(f"--out: cannot use {out!r} as a directory ({exc.strerror}).") from None
        first, last = span
        settled = settled_days(first, last)
        written = 0
        for current in days_between(first, last):
            if current not in settled:
                self.stderr.write(f"skipped {current}: not finalised yet (run aggregate_usage first)")
                continue
            query = UsageQuery(start=current, end=current, today=today, scope=scope, group_by=GROUP_DIMENSIONS)
            rows = exports.grouped_rows(query, pseudonymize=not no_pseudonymize)
            count = self.write_day(directory, current.isoformat(), FORMATS[fmt], rows)
            written += 1
            self.stdout.write(f"{current}: {count} rows → " + ", ".join(
                str(directory / f"usage-{current}.{ext}") for ext in FORMATS[fmt]))
        if not written:
            raise CommandError(f"No finalised day between {first} and {last}: nothing written.")

    @staticmethod
    def write_day(directory: Path, day: str, formats: tuple[str, ...], rows: Iterator[dict[str, Any]]) -> int:
        """One pass over the day's rows, into every requested format; returns the row count."""
        columns = exports.grouped_columns(GROUP_DIMENSIONS)
        targets = {ext: directory / f"usage-{day}.{ext}" for ext in formats}
        temporary = {ext: path.with_name(f".{path.name}.{os.getpid()}.tmp") for ext, path in targets.items()}
        handles = {ext: temporary[ext].open("w", encoding="utf-8", newline="") for ext in formats}
        count = 0
        try:
            writer = None
            if "csv" in handles:
                writer = csv.writer(handles["csv"], lineterminator="\r\n")
                writer.writerow(columns)
            for row in rows:
                count += 1
                if writer is not None:
                    writer.writerow([exports.csv_cell(row.get(column)) for column in columns])
                if "jsonl" in handles:
                    handles["jsonl"].write(exports.dumps_row(row) + "\n")
            for handle in handles.values():
                handle.flush()
                os.fsync(handle.fileno())
        except BaseException:
            for ext, handle in handles.items():
                handle.close()
                temporary[ext].unlink(missing_ok=True)
            raise
        for ext, handle in handles.items():
            handle.close()
            os.replace(temporary[ext], targets[ext])
        return count
