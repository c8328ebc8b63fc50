"""What both dialects share: the table shapes, SQL quoting, the writer of a batch and the calls of a warehouse."""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, TypeVar

import polars as pl

from readmission_platform.lib.reporting import masked

T = TypeVar("T")

SQL_TYPES = {
    pl.Int16: "SMALLINT",
    pl.Int32: "INTEGER",
    pl.Int64: "BIGINT",
    pl.Float64: "DOUBLE PRECISION",
    pl.String: "TEXT",
    pl.Boolean: "BOOLEAN",
    pl.Datetime: "TIMESTAMP WITH TIME ZONE",
}
# Names with a double underscore are the warehouse's own (partitions, staging tables), never a platform table.
IDENTIFIER = re.compile(r"^[a-z](?:[a-z0-9]|_(?!_))*_?$")
Columns = Mapping[str, pl.DataType]
Writes = Mapping[str, tuple[Columns, pl.DataFrame]]


class WarehouseError(Exception):
    """A table does not have the shape the platform writes, or the warehouse cannot be reached."""


def quote(name: str) -> str:
    # Column names such as "A1Cresult" and "glyburide-metformin" need quoting in both dialects.
    return '"' + name.replace('"', '""') + '"'


def literal(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def checked(table: str) -> str:
    if not IDENTIFIER.match(table):
        raise WarehouseError(f"table name {table!r} is not a plain lower-case SQL identifier")
    return table


def body(columns: Columns, defaults: Mapping[str, str] | None = None) -> str:
    defaults = defaults or {}
    return ", ".join(
        f"{quote(name)} {SQL_TYPES[dtype.base_type()]}" + (f" DEFAULT {defaults[name]}" if name in defaults else "")
        for name, dtype in columns.items()
    )



def table_ddl(table: str, columns: Columns) -> str:
    return f"CREATE TABLE IF NOT EXISTS {checked(table)} ({body(columns)})"


class BatchWriter(ABC):
    """Collects the tables of one batch; `Warehouse.batch_writer` makes them the batch's rows together, or none."""

    @abstractmethod
    def put(self, table: str, columns: Columns, frame: pl.DataFrame) -> None:
        """Make `frame` the batch's rows of `table` (created from `columns` if missing) when the block ends."""

    @abstractmethod
    def discard(self, table: str) -> None:
        """Take back what was put for `table`: its stored rows stay as they are."""

    @abstractmethod
    def stored_elsewhere(self, table: str, column: str, *, text: bool = False) -> pl.DataFrame:
        """(`column` as a BIGINT, or as text with `text`, batch_id) of every row other batches store in `table` (none
        before it exists).

        The write then goes through only if, when the block ends, no value of `column` put for `table` is stored by
        another batch (`ConflictingWrite` otherwise, and nothing is written): a writer of another batch that stored
        one of them meanwhile is noticed, however many write at once.
        """


class ConflictingWrite(WarehouseError):
    """Another batch stored some of the values a write needs to be unique; read them again and retry."""


# Passes over a batch whose unique values another batch stored meanwhile, before giving up (`retried_on_conflict`).
CONFLICT_ATTEMPTS = 3


def retried_on_conflict(write: Callable[[], T]) -> T:
    """`write()`: a batch writer's whole block, which reads what other batches stored (`stored_elsewhere`) and then
    puts; passed again, reading afresh, while another batch stored one of its unique values meanwhile, at most
    `CONFLICT_ATTEMPTS` times in all (`ConflictingWrite` from the last)."""
    for _ in range(CONFLICT_ATTEMPTS - 1):
        try:
            return write()
        except ConflictingWrite:
            continue
    return write()


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
    def batch_writer(self, batch_id: str) -> Iterator[BatchWriter]:
        """A context manager: the tables put in the block replace their rows of `batch_id` in one transaction when
        the block ends without an error; after an error nothing stored has changed."""

    @abstractmethod
    def _replace(self, table: str, columns: Columns, frame: pl.DataFrame, *, keep: bool) -> None:
        """In one transaction: create the table if needed, delete its rows unless `keep`, insert the frame."""

    def replace_batch(self, writes: Writes, batch_id: str) -> None:
        """In one transaction, make each table's rows for `batch_id` exactly the given frame's rows."""
        with self.batch_writer(batch_id) as writer:
            for table, (columns, frame) in writes.items():
                writer.put(table, columns, frame)

    def replace_table(self, table: str, columns: Columns, frame: pl.DataFrame) -> None:
        """In one transaction, make the table's rows exactly the frame's rows."""
        self._replace(checked(table), columns, frame, keep=False)

    def append(self, table: str, columns: Columns, frame: pl.DataFrame) -> None:
        """Add the frame's rows to the table."""
        self._replace(checked(table), columns, frame, keep=True)

    def add_columns(self, table: str, columns: Columns) -> list[str]:
        """Widen a table made by an earlier version to `columns`, in one transaction: the columns it lacks are added
        at its end, NULL in the rows it holds. Its columns must be the first of `columns`, in order; a table that
        does not exist is left to the next write to create. Returns the names added."""
        existing = list(self.columns(checked(table)))
        wanted = list(columns)
        if not existing or existing == wanted:
            return []
        if existing != wanted[: len(existing)]:
            self._check_columns(table, columns, existing)  # raises: columns renamed, reordered or unknown
        added = wanted[len(existing) :]
        self._execute([f"ALTER TABLE {table} ADD COLUMN {body({name: columns[name]})}" for name in added])
        return added

    def _execute(self, statements: Sequence[str]) -> None:
        """Run the statements in one transaction."""
        with self._transaction() as connection:
            for statement in statements:
                connection.execute(statement)

    @abstractmethod
    def _transaction(self):
        """A context manager giving a connection in a transaction, committed when the block ends without an error and
        rolled back otherwise."""

    def tables(self) -> set[str]:
        """Names of the tables that exist."""
        rows = self.query("SELECT table_name FROM information_schema.tables "
            "WHERE table_catalog = current_database() AND table_schema = current_schema()")
        return {name for name in rows["table_name"] if "__" not in name} if rows.height else set()

    def columns(self, table: str) -> dict[str, str]:
        """Column name → SQL type name of an existing table, in table order."""
        rows = self.query(
            "SELECT column_name, data_type FROM information_schema.columns "
            "WHERE table_catalog = current_database() AND table_schema = current_schema() AND table_name = $1 "
            "ORDER BY ordinal_position",
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

    def describe(self) -> str:
        return masked(self.url)

    def _check_columns(self, table: str, columns: Columns, existing: Sequence[str] | None = None) -> None:
        existing = list(self.columns(table)) if existing is None else list(existing)
        if existing and existing != list(columns):
            raise WarehouseError(
                f"table {table} in {self.describe()} has columns {existing}; the platform writes {list(columns)}. "
                "Drop or rename the old table to let the platform recreate it."
            )


def stored_elsewhere(
    warehouse: Warehouse, table: str, column: str, batch_id: str, part: str = "", *, text: bool = False
) -> pl.DataFrame:
    """(column, batch_id) of the other batches' rows of `table`, the column as a BIGINT (as text with `text`); with
    `part`, a column `part` too, naming the table each row lies in, computed once per batch from `part` (an
    expression over `tableoid`)."""
    # One row per batch with its values in a list: a few rows cross the wire instead of one per encounter.
    grouped = (
        f"SELECT batch_id{', tableoid' if part else ''}, array_agg(CAST({quote(column)} AS {sql_kind(text)})) AS {quote(column)} "
        f"FROM {checked(table)} WHERE batch_id <> $1 GROUP BY batch_id{', tableoid' if part else ''}"
    )
    found = warehouse.query(f"SELECT *, {part} AS part FROM ({grouped}) AS stored" if part else grouped, [batch_id])
    if not found.width:  # no table yet: nothing stored
        return pl.DataFrame(schema={column: polars_kind(text), "batch_id": pl.String} | ({"part": pl.String} if part else {}))
    return found.explode(column).select(pl.col(column).cast(polars_kind(text)), "batch_id", *(["part"] if part else []))


def sql_kind(text: bool) -> str:
    """The SQL type a unique column's values are compared as (`stored_elsewhere`)."""
    return "TEXT" if text else "BIGINT"


def polars_kind(text: bool) -> pl.DataType:
    """The polars type of a unique column's values (`stored_elsewhere`)."""
    return pl.String() if text else pl.Int64()
