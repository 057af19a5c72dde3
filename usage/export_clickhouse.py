"""The ClickHouse destination, over its HTTP interface, delivering each day exactly once.

ClickHouse 18.16 (Debian's package) has no insert deduplication token, so exactness comes from
partitions: the table is ``PARTITION BY day``, and a day is

1. loaded whole into a staging table of the same structure (``<table>__staging_YYYYMMDD``, dropped
   and created again first, so rows a killed attempt left there are gone),
2. counted there, and refused unless the count is what was sent,
3. swapped in with ``ALTER TABLE … REPLACE PARTITION … FROM staging``, which replaces the day's
   rows atomically, then the staging table is dropped.

A delivery killed before step 3 leaves the table as it was; one killed after it leaves the new
day in place, and the retry replaces it by the same rows. Either way each row is in the table
once. The rows are streamed (chunked transfer encoding), so memory stays flat whatever the day's
size.
"""

from __future__ import annotations

import base64
import contextlib
import http.client
import ssl
from collections.abc import Iterable, Iterator
from datetime import date
from urllib.parse import urlencode, urlsplit

from usage.export_rows import DayRows
from usage.export_schema import clickhouse_create

ERROR_CHARS = 500


class ClickHouseError(Exception):
    """ClickHouse refused a statement, or could not be reached (the message names which)."""


class ClickHouseSink:
    def __init__(self, *, url: str, database: str, table: str, username: str = "", password: str = "",
                 timeout: float = 300.0) -> None:
        parts = urlsplit(url)
        self.https = parts.scheme == "https"
        self.host = parts.hostname or ""
        self.port = parts.port or (8443 if self.https else 8123)
        self.database = database
        self.table = table
        self.timeout = timeout
        self.headers = {}
        if username or password:
            token = base64.b64encode(f"{username}:{password}".encode()).decode()
            self.headers["Authorization"] = f"Basic {token}"

    def _name(self, table: str) -> str:
        return f"`{self.database}`.`{table}`"

    def execute(self, query: str, body: bytes | Iterable[bytes] = b"", **settings: str) -> str:
        """Run one statement; ``body`` (for ``INSERT … FORMAT``) may be an iterable of chunks."""
        params = urlencode({"query": query, **settings})
        if self.https:
            connection: http.client.HTTPConnection = http.client.HTTPSConnection(
                self.host, self.port, timeout=self.timeout, context=ssl.create_default_context())
        else:
            connection = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
        where = f"ClickHouse at {self.host}:{self.port}"
        try:
            # ClickHouse may refuse an INSERT before reading all of it: then its answer says why.
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                connection.request("POST", f"/?{params}", body=body, headers=self.headers,
                                   encode_chunked=not isinstance(body, bytes))
            response = connection.getresponse()
            text = response.read().decode("utf-8", "replace")
        except (OSError, http.client.HTTPException) as exc:
            raise ClickHouseError(f"cannot talk to {where}: {exc.__class__.__name__}: {exc}") from exc
        finally:
            connection.close()
        if response.status != 200:
            raise ClickHouseError(f"{where} answered HTTP {response.status}: {text.strip()[:ERROR_CHARS]}")
        return text

    def ensure_table(self, level: str) -> None:
        self.execute(f"CREATE DATABASE IF NOT EXISTS `{self.database}`")
        self.execute(clickhouse_create(level, database=self.database, table=self.table))

    def deliver(self, day: date, level: str, rows: DayRows) -> None:
        self.ensure_table(level)
        staging = self._name(f"{self.table}__staging_{day:%Y%m%d}")
        self.execute(f"DROP TABLE IF EXISTS {staging}")
        self.execute(f"CREATE TABLE {staging} AS {self._name(self.table)}")
        self.execute(f"INSERT INTO {staging} FORMAT JSONEachRow", _chunks(rows),
                     date_time_input_format="best_effort", input_format_skip_unknown_fields="0")
        loaded = int(self.execute(f"SELECT count() FROM {staging}").strip() or 0)  # noqa: S608 (validated names)
        if loaded != rows.count:
            raise ClickHouseError(f"the staging table holds {loaded} rows of {day}, {rows.count} were sent")
        self.execute(f"ALTER TABLE {self._name(self.table)} REPLACE PARTITION '{day.isoformat()}' FROM {staging}")
        self.execute(f"DROP TABLE IF EXISTS {staging}")


def _chunks(rows: DayRows) -> Iterator[bytes]:
    for _batch, data in rows.batches():
        yield data
