"""The warehouse: one DuckDB file by default, PostgreSQL for a team; the same calls for both.

Tables are created from the polars schemas of `lib/schema.py`; a batch's rows are replaced in one
transaction, and PostgreSQL is loaded in bulk through ADBC (binary COPY), never row by row.
"""

from __future__ import annotations

import random
import re
import time
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import polars as pl

from readmission_platform.lib.reporting import masked

SQL_TYPES = {
    pl.Int16: "SMALLINT",
    pl.Int32: "INTEGER",
    pl.Int64: "BIGINT",
    pl.Float64: "DOUBLE PRECISION",
    pl.String: "TEXT",
    pl.Boolean: "BOOLEAN",
    pl.Datetime: "TIMESTAMP WITH TIME ZONE",
}
IDENTIFIER = re.compile(r"^[a-z_][a-z0-9_]*$")
Writes = Mapping[str, tuple[Mapping[str, pl.DataType], pl.DataFrame]]


class WarehouseError(Exception):
    """A table does not have the shape the platform writes, or the warehouse cannot be reached."""


def quote(name: str) -> str:
    # Column names such as "A1Cresult" and "glyburide-metformin" need quoting in both dialects.
    return '"' + name.replace('"', '""') + '"'


def table_ddl(table: str, columns: Mapping[str, pl.DataType]) -> str:
    if not IDENTIFIER.match(table):
        raise WarehouseError(f"table name {table!r} is not a plain lower-case SQL identifier")
    body = ", ".join(f"{quote(name)} {SQL_TYPES[dtype.base_type()]}" for name, dtype in columns.items())
    return f"CREATE TABLE IF NOT EXISTS {table} ({body})"


class Warehouse(ABC):
    """Replace, read and query the platform's tables.

    Used as a context manager it keeps one connection for everything inside the block (an asset's
    reads and writes); outside a block each call opens and closes its own.
    """

    url: str
    _connection: Any = None

    def __enter__(self) -> Warehouse:
        self._session = self._connect()
        self._connection = self._session.__enter__()
        return self

    def __exit__(self, *exc_info) -> None:
        self._connection = None
        self._session.__exit__(*exc_info)

    @contextmanager
    def _connected(self):
        if self._connection is not None:
            yield self._connection
        else:
            with self._connect() as connection:
                yield connection

    @abstractmethod
    def _connect(self):
        """A context manager giving a new connection."""

    @abstractmethod
    def query(self, sql: str, params: Sequence[Any] = ()) -> pl.DataFrame:
        """Run a query (parameters as $1, $2, …) and return its rows; a missing table reads as no rows."""

    @abstractmethod
    def _write(self, connection, writes: Writes, where: str | None, params: list) -> None:
        """In one transaction on `connection`: per table, create it if needed, delete the rows `where`
        selects (none when None), insert the frame."""

    def _replace(self, writes: Writes, where: str | None, params: list) -> None:
        for table, (columns, _) in writes.items():
            self._check_columns(table, columns)
        with self._connected() as connection:
            self._write(connection, writes, where, params)

    def replace_batch(self, writes: Writes, batch_id: str) -> None:
        """In one transaction, make each table's rows for `batch_id` exactly the given frame's rows."""
        self._replace(writes, "WHERE batch_id = $1", [batch_id])

    def replace_table(self, table: str, columns: Mapping[str, pl.DataType], frame: pl.DataFrame) -> None:
        """In one transaction, make the table's rows exactly the frame's rows."""
        self._replace({table: (columns, frame)}, "", [])

    def append(self, table: str, columns: Mapping[str, pl.DataType], frame: pl.DataFrame) -> None:
        """Add the frame's rows to the table."""
        self._replace({table: (columns, frame)}, None, [])

    def tables(self) -> set[str]:
        """Names of the tables that exist."""
        rows = self.query("SELECT table_name FROM information_schema.tables WHERE table_schema = current_schema()")
        return set(rows["table_name"]) if rows.height else set()

    def columns(self, table: str) -> dict[str, str]:
        """Column name → SQL type name of an existing table, in table order."""
        rows = self.query(
            "SELECT column_name, data_type FROM information_schema.columns "
            "WHERE table_schema = current_schema() AND table_name = $1 ORDER BY ordinal_position",
            [table],
        )
        return dict(zip(rows["column_name"], rows["data_type"])) if rows.height else {}

    def read_table(self, table: str, batch_id: str | None = None) -> pl.DataFrame:
        if batch_id is None:
            rows = self.query(f"SELECT * FROM {table}")
        else:
            rows = self.query(f"SELECT * FROM {table} WHERE batch_id = $1", [batch_id])
        if not rows.width:
            raise WarehouseError(f"table {table!r} does not exist in {self.describe()}; materialize its asset first")
        return rows

    def shape_problems(self, table: str, columns: Mapping[str, pl.DataType], batch_id: str) -> tuple[list[str], int]:
        """What is wrong with a batch's rows of `table` (other columns than declared, no rows), and their count."""
        actual = list(self.columns(table))
        rows = self.query(f"SELECT count(*) AS n FROM {table} WHERE batch_id = $1", [batch_id]) if actual else pl.DataFrame()
        count = int(rows["n"][0]) if rows.height else 0
        problems = []
        if actual != list(columns):
            missing = [c for c in columns if c not in actual]
            extra = [c for c in actual if c not in columns]
            problems.append(f"{table} columns differ from the declared ones: missing {missing}, unexpected {extra}")
        if not count:
            problems.append(f"batch {batch_id} has no rows in {table}")
        return problems, count

    def describe(self) -> str:
        return masked(self.url)

    def _check_columns(self, table: str, columns: Mapping[str, pl.DataType]) -> None:
        existing = list(self.columns(table))
        if existing and existing != list(columns):
            raise WarehouseError(
                f"table {table} in {self.describe()} has columns {existing}; the platform writes {list(columns)}. "
                "Drop or rename the old table to let the platform recreate it."
            )


class DuckDBWarehouse(Warehouse):
    """A DuckDB file. DuckDB admits one writing process; a second one waits here for the lock."""

    LOCK_WAIT_SECONDS = 120.0

    def __init__(self, path: Path):
        self.path = Path(path)
        self.url = f"duckdb:///{self.path}"

    @contextmanager
    def _connect(self):
        import duckdb

        self.path.parent.mkdir(parents=True, exist_ok=True)
        deadline = time.monotonic() + self.LOCK_WAIT_SECONDS
        while True:
            try:
                connection = duckdb.connect(str(self.path))
                break
            except duckdb.IOException as error:
                if "lock" not in str(error).lower() or time.monotonic() > deadline:
                    raise WarehouseError(f"cannot open {self.path}: {error}") from error
                time.sleep(random.uniform(0.05, 0.3))
        try:
            # Timestamps then read back as UTC, as written and as PostgreSQL returns them, not in the host's zone.
            connection.execute("SET TimeZone = 'UTC'")
            yield connection
        finally:
            connection.close()

    def query(self, sql: str, params: Sequence[Any] = ()) -> pl.DataFrame:
        import duckdb

        with self._connected() as connection:
            try:
                return pl.from_arrow(connection.sql(sql, params=list(params) or None).to_arrow_table())
            except duckdb.CatalogException as error:
                if "does not exist" in str(error):
                    return pl.DataFrame()
                raise

    def _write(self, connection, writes, where, params):
        connection.begin()
        try:
            for table, (columns, frame) in writes.items():
                connection.execute(table_ddl(table, columns))
                if where is not None:
                    connection.execute(f"DELETE FROM {table} {where}", params)
                connection.register("incoming", frame.select(list(columns)).to_arrow())
                connection.execute(f"INSERT INTO {table} SELECT * FROM incoming")
                connection.unregister("incoming")
            connection.commit()
        except BaseException:
            connection.rollback()
            raise


class PostgresWarehouse(Warehouse):
    """A PostgreSQL database, reached through ADBC so reads and loads move Arrow batches (binary COPY)."""

    # The last connection is kept for the next block in this process, so a run's steps share it
    # instead of paying ~60 ms each for a new one. One at most: a process never hoards connections.
    _idle: dict[str, Any] = {}

    def __init__(self, url: str):
        self.url = url

    @contextmanager
    def _connect(self):
        import adbc_driver_postgresql.dbapi as adbc

        connection = self._idle.pop(self.url, None)
        for stale in self._idle.values():
            stale.close()
        self._idle.clear()
        if connection is not None and not _alive(connection):
            connection.close()
            connection = None
        if connection is None:
            try:
                connection = adbc.connect(self.url)
            except Exception as error:
                raise WarehouseError(f"cannot connect to {self.describe()}: {error}") from error
        healthy = False
        try:
            yield connection
            healthy = True
        finally:
            if healthy and not self._idle:
                self._idle[self.url] = connection
            else:
                connection.close()

    def query(self, sql: str, params: Sequence[Any] = ()) -> pl.DataFrame:
        with self._connected() as connection, connection.cursor() as cursor:
            try:
                cursor.execute(sql, list(params) if params else None)
                rows = pl.from_arrow(cursor.fetch_arrow_table())
            except Exception as error:
                connection.rollback()
                if "does not exist" in str(error) and "relation" in str(error):
                    return pl.DataFrame()
                raise
            # End the read's transaction, so a kept connection does not sit idle inside one.
            connection.commit()
            return rows

    def _write(self, connection, writes, where, params):
        try:
            with connection.cursor() as cursor:
                for table, (columns, frame) in writes.items():
                    cursor.execute(table_ddl(table, columns))
                    if "batch_id" in columns:
                        # Reads and deletes select one batch; without the index each scans the table.
                        cursor.execute(f"CREATE INDEX IF NOT EXISTS {table}_batch_id ON {table} (batch_id)")
                    if where is not None:
                        cursor.execute(f"DELETE FROM {table} {where}", params or None)
                    if frame.height:
                        cursor.adbc_ingest(table, frame.select(list(columns)).to_arrow(), mode="append")
            connection.commit()
        except BaseException:
            connection.rollback()
            raise


def _alive(connection) -> bool:
    """A kept connection may have been closed by the server (restart, dropped database) meanwhile."""
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
            cursor.fetchall()
        connection.commit()
        return True
    except Exception:
        return False


def open_warehouse(url: str) -> Warehouse:
    """`postgresql://…` → PostgreSQL; `duckdb:///path`, or a plain path → that DuckDB file."""
    if url.startswith(("postgresql://", "postgres://")):
        return PostgresWarehouse(url)
    path = url.removeprefix("duckdb:///") if url.startswith("duckdb:///") else url.removeprefix("duckdb://")
    if "://" in path:
        raise WarehouseError(f"warehouse URL {url!r} is neither postgresql://… nor duckdb:///path")
    return DuckDBWarehouse(Path(path))
