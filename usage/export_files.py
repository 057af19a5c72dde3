"""The files destination: one Hive-style partition per UTC day, in Parquet and in JSON Lines.

Layout under the destination's directory (one tree per format, so a loader's wildcard or a
dataset reader never mixes them)::

    parquet/<table>/day=YYYY-MM-DD/part-0.parquet
    jsonl/<table>/day=YYYY-MM-DD/part-0.jsonl
    _schema/<table>.bigquery.json        (for ``bq mk`` / ``bq load --schema``)
    _schema/<table>.clickhouse.sql       (the table ``INSERT … FORMAT JSONEachRow`` loads into)

Both files of a day are written under hidden temporary names in their partition (dataset readers
such as pyarrow and Spark skip names starting with a dot), flushed to disk, then
renamed over the previous ones: a reader sees the old day or the new day, never a part, and
delivering a day again replaces it. Temporary files a killed delivery left behind are removed by
the next delivery of that day.
"""

from __future__ import annotations

import functools
import json
import os
import uuid
from datetime import date
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from usage.export_rows import DayRows
from usage.export_schema import COLUMNS, Column, bigquery_schema, clickhouse_create

PART = "part-0"
_ARROW: dict[str, pa.DataType] = {
    "string": pa.string(), "date": pa.date32(), "timestamp": pa.timestamp("us", tz="UTC"), "int": pa.int64(),
    "float": pa.float64(), "bool": pa.bool_(),
}
_CAST = {"date", "timestamp"}  # arrives as ISO text, converted by Arrow


def arrow_type(column: Column) -> pa.DataType:
    return _ARROW[column.kind]


@functools.cache
def arrow_schema(level: str) -> pa.Schema:
    return pa.schema([pa.field(c.name, arrow_type(c), nullable=c.nullable) for c in COLUMNS[level]])


def partition(root: Path, fmt: str, table: str, day: date) -> Path:
    return root / fmt / table / f"day={day.isoformat()}"


def record_batch(level: str, rows: list[dict[str, Any]]) -> pa.RecordBatch:
    arrays = []
    for column in COLUMNS[level]:
        values = [row[column.name] for row in rows]
        if column.kind in _CAST:
            arrays.append(pa.array(values, pa.string()).cast(arrow_type(column)))
        else:
            arrays.append(pa.array(values, arrow_type(column)))
    return pa.RecordBatch.from_arrays(arrays, schema=arrow_schema(level))


def _write_atomically(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")
    try:
        temporary.write_bytes(data)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def _fsync_dir(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


class FilesSink:
    def __init__(self, root: Path, table: str) -> None:
        self.root = root
        self.table = table

    def write_schemas(self, level: str) -> None:
        schemas = self.root / "_schema"
        _write_atomically(schemas / f"{self.table}.bigquery.json",
                          (json.dumps(bigquery_schema(level), indent=2) + "\n").encode())
        _write_atomically(schemas / f"{self.table}.clickhouse.sql",
                          ("CREATE DATABASE IF NOT EXISTS `twinmcp`;\n"
                           + clickhouse_create(level, database="twinmcp", table=self.table) + ";\n").encode())

    def deliver(self, day: date, level: str, rows: DayRows) -> None:
        self.write_schemas(level)
        targets = {fmt: partition(self.root, fmt, self.table, day) / f"{PART}.{fmt}" for fmt in ("parquet", "jsonl")}
        token = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
        temporary = {fmt: path.with_name(f".{path.name}.{token}.tmp") for fmt, path in targets.items()}
        for path in targets.values():
            path.parent.mkdir(parents=True, exist_ok=True)
            for stale in path.parent.glob(f".{PART}.*.tmp"):
                stale.unlink(missing_ok=True)
        try:
            with pq.ParquetWriter(temporary["parquet"], arrow_schema(level)) as parquet, \
                    temporary["jsonl"].open("wb") as jsonl:
                for batch, data in rows.batches():
                    parquet.write_batch(record_batch(level, batch))
                    jsonl.write(data)
                jsonl.flush()
                os.fsync(jsonl.fileno())
            with temporary["parquet"].open("rb") as written:
                os.fsync(written.fileno())
            for fmt, path in targets.items():
                os.replace(temporary[fmt], path)
                _fsync_dir(path.parent)
        finally:
            for path in temporary.values():
                path.unlink(missing_ok=True)
