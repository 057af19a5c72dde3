"""The rows of one UTC day for an export destination, read once, in batches, with constant memory.

``day_rows`` gives the same rows as the CSV / JSON exports (``usage.exports``), in the column order
of ``usage.export_schema`` and with the day first; user ids are always text (a pseudonym, or the
id as a string), so the column has one type whatever the destination's choice. ``DayRows`` counts
the rows and hashes their JSON Lines as they pass: both sinks record the same checksum for the same
data, so an analyst can compare a file with a table.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Iterator
from datetime import date
from typing import Any

from django.db.models import Q
from django.utils import timezone

from usage import exports
from usage.export_schema import COLUMNS
from usage.models import ExportLevel
from usage.queries import GROUP_DIMENSIONS, UsageQuery

BATCH_ROWS = 10_000


def day_rows(level: str, day: date, *, pseudonymize: bool) -> Iterator[dict[str, Any]]:
    query = UsageQuery(start=day, end=day, today=timezone.now().date(), scope=Q(), group_by=GROUP_DIMENSIONS)
    source = (exports.grouped_rows(query, pseudonymize=pseudonymize) if level == ExportLevel.DAILY
              else exports.event_rows(query, pseudonymize=pseudonymize))
    names = [column.name for column in COLUMNS[level]]
    shown_day = day.isoformat()
    for row in source:
        row["day"] = shown_day
        if row["user_id"] is not None:
            row["user_id"] = str(row["user_id"])
        yield {name: row[name] for name in names}


class DayRows:
    """One pass over a day's rows in batches of ``BATCH_ROWS``, each with its JSON Lines bytes.
    ``progress(rows_so_far)`` runs after each batch: a long delivery renews its lease there."""

    def __init__(self, rows: Iterable[dict[str, Any]], *, batch_rows: int = BATCH_ROWS,
                 progress: Callable[[int], None] | None = None) -> None:
        self._rows = rows
        self._batch_rows = batch_rows
        self._progress = progress
        self._hash = hashlib.sha256()
        self.count = 0

    @property
    def checksum(self) -> str:
        return self._hash.hexdigest()

    def batches(self) -> Iterator[tuple[list[dict[str, Any]], bytes]]:
        batch: list[dict[str, Any]] = []
        for row in self._rows:
            batch.append(row)
            if len(batch) >= self._batch_rows:
                yield self._passed(batch)
                batch = []
        if batch:
            yield self._passed(batch)

    def _passed(self, batch: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], bytes]:
        data = "".join(exports.dumps_row(row) + "\n" for row in batch).encode()
        self._hash.update(data)
        self.count += len(batch)
        if self._progress is not None:
            self._progress(self.count)
        return batch, data
