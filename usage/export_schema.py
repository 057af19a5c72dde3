"""The columns a usage export destination receives, per level, and their types in each sink.

One list per level is the single description of the delivered data: the Parquet schema
(``usage.export_files``, which alone imports pyarrow), the
ClickHouse table, the BigQuery schema in ``docs/usage-exports.md`` and the order of the JSON Lines
keys all come from it. Rows are produced by ``usage.exports`` (the same rows the CSV / JSON exports
give) with the UTC ``day`` first, so every row says which partition it belongs to.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from usage.models import ExportLevel

Kind = Literal["string", "date", "timestamp", "int", "float", "bool"]

_CLICKHOUSE = {"string": "String", "date": "Date", "timestamp": "DateTime('UTC')", "int": "Int64",
               "float": "Float64", "bool": "UInt8"}
_BIGQUERY = {"string": "STRING", "date": "DATE", "timestamp": "TIMESTAMP", "int": "INT64", "float": "FLOAT64",
             "bool": "BOOL"}


@dataclass(frozen=True)
class Column:
    name: str
    kind: Kind
    nullable: bool = True

    @property
    def clickhouse(self) -> str:
        base = _CLICKHOUSE[self.kind]
        return f"Nullable({base})" if self.nullable else base

    @property
    def bigquery(self) -> str:
        return _BIGQUERY[self.kind]


def _counts(*names: str) -> tuple[Column, ...]:
    return tuple(Column(name, "int", nullable=False) for name in names)


DAILY = (
    Column("day", "date", nullable=False),
    Column("workspace", "string"),
    Column("user_id", "string"), Column("username", "string"), Column("email", "string"),
    Column("server_id", "string"), Column("server_name", "string"), Column("tool", "string"),
    *_counts("requests", "counted", "errors", "quota_rejections", "blocked", "tokens_in", "tokens_out", "bytes_in",
             "bytes_out"),
    Column("latency_avg_ms", "float"), Column("latency_p95_ms", "float"),
    Column("first_at", "timestamp"), Column("last_at", "timestamp"),
    Column("error_rate", "float"),
    *_counts("timeouts", "upstream_errors", "client_disconnects", "outcome_ok", "outcome_error", "outcome_quota",
             "outcome_blocked", "outcome_timeout", "outcome_upstream_error", "outcome_client_disconnect"),
)

EVENTS = (
    Column("day", "date", nullable=False),
    Column("created_at", "timestamp", nullable=False),
    Column("workspace", "string"),
    Column("user_id", "string"), Column("username", "string"), Column("email", "string"),
    Column("server_id", "string"), Column("server_name", "string"), Column("api_key_id", "string"),
    Column("method", "string", nullable=False), Column("tool", "string", nullable=False),
    Column("request_id", "string", nullable=False), Column("jsonrpc_id", "string", nullable=False),
    Column("outcome", "string", nullable=False), Column("counted", "bool", nullable=False),
    *_counts("tokens_in", "tokens_out", "bytes_in", "bytes_out"),
    Column("latency_ms", "float", nullable=False),
    Column("upstream_status", "int"), Column("jsonrpc_error_code", "int"),
    Column("endpoint", "string", nullable=False), Column("toolset_id", "string"),
)

COLUMNS: dict[str, tuple[Column, ...]] = {ExportLevel.DAILY: DAILY, ExportLevel.EVENTS: EVENTS}
TABLES = {ExportLevel.DAILY: "usage_daily", ExportLevel.EVENTS: "usage_events"}
# The ClickHouse sort key: what analysts filter on after the day.
ORDER_BY = {ExportLevel.DAILY: ("day", "workspace", "server_id", "tool"),
            ExportLevel.EVENTS: ("day", "workspace", "created_at")}


def bigquery_schema(level: str) -> list[dict[str, str]]:
    """The table schema ``bq mk`` / ``bq load --schema`` take, as JSON."""
    return [{"name": c.name, "type": c.bigquery, "mode": "NULLABLE" if c.nullable else "REQUIRED"}
            for c in COLUMNS[level]]


def clickhouse_create(level: str, *, database: str, table: str) -> str:
    """The table the ClickHouse sink creates: one partition per day, which a delivery replaces.
    A Nullable column cannot be in a MergeTree sort key (18.16): ifNull makes it sortable."""
    nullable = {c.name for c in COLUMNS[level] if c.nullable}
    order = ", ".join(f"ifNull(`{n}`, '')" if n in nullable else f"`{n}`" for n in ORDER_BY[level])
    columns = ",\n".join(f"    `{c.name}` {c.clickhouse}" for c in COLUMNS[level])
    return (f"CREATE TABLE IF NOT EXISTS `{database}`.`{table}` (\n{columns}\n)\n"
            f"ENGINE = MergeTree PARTITION BY day ORDER BY ({order})")
