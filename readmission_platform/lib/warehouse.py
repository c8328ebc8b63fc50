"""The warehouse: one DuckDB file by default, PostgreSQL for a team; the same calls for both.

Tables are created from the polars schemas of `lib/schema.py`. A batch's rows of several tables are replaced together
in one transaction (`Warehouse.batch_writer`). On PostgreSQL every table written by batch is partitioned by
`batch_id`: each table's new rows are streamed by COPY into a staging table of their own, several tables at once on
separate connections, and one short transaction then swaps the staged tables in for the batch's old partitions. A
failure before that swap leaves every stored row as it was.
"""

from __future__ import annotations

import hashlib
import random
import re
import secrets
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
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


def _checked(table: str) -> str:
    if not IDENTIFIER.match(table):
        raise WarehouseError(f"table name {table!r} is not a plain lower-case SQL identifier")
    return table


def _body(columns: Columns, defaults: Mapping[str, str] | None = None) -> str:
    defaults = defaults or {}
    return ", ".join(
        f"{quote(name)} {SQL_TYPES[dtype.base_type()]}" + (f" DEFAULT {defaults[name]}" if name in defaults else "")
        for name, dtype in columns.items()
    )


def _constants(frame: pl.DataFrame) -> dict[str, str]:
    """SQL literals of the columns that hold one value in every row (text, integers, booleans and timestamps)."""
    found = {}
    for name, series in frame.to_dict().items():
        kind = series.dtype.base_type()
        if not frame.height or series.null_count() or kind not in SQL_TYPES or kind is pl.Float64:
            continue
        first = series[0]
        if first != series[-1] or not (series == first).all():
            continue
        if kind is pl.String:
            found[name] = literal(first)
        elif kind is pl.Datetime:
            found[name] = literal(first.isoformat()) + "::timestamptz"
        elif kind is pl.Boolean:
            found[name] = "TRUE" if first else "FALSE"
        else:
            found[name] = str(int(first))
    return found


def table_ddl(table: str, columns: Columns) -> str:
    return f"CREATE TABLE IF NOT EXISTS {_checked(table)} ({_body(columns)})"


class BatchWriter(ABC):
    """Collects the tables of one batch; `Warehouse.batch_writer` makes them the batch's rows together, or none."""

    @abstractmethod
    def put(self, table: str, columns: Columns, frame: pl.DataFrame) -> None:
        """Make `frame` the batch's rows of `table` (created from `columns` if missing) when the block ends."""

    @abstractmethod
    def discard(self, table: str) -> None:
        """Take back what was put for `table`: its stored rows stay as they are."""

    @abstractmethod
    def stored_elsewhere(self, table: str, column: str) -> pl.DataFrame:
        """(`column` as a BIGINT, batch_id) of every row other batches store in `table` (none before it exists).

        The write then goes through only if, when the block ends, no value of `column` put for `table` is stored by
        another batch (`ConflictingWrite` otherwise, and nothing is written): a writer of another batch that stored
        one of them meanwhile is noticed, however many write at once.
        """


class ConflictingWrite(WarehouseError):
    """Another batch stored some of the values a write needs to be unique; read them again and retry."""


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
        self._replace(_checked(table), columns, frame, keep=False)

    def append(self, table: str, columns: Columns, frame: pl.DataFrame) -> None:
        """Add the frame's rows to the table."""
        self._replace(_checked(table), columns, frame, keep=True)

    def tables(self) -> set[str]:
        """Names of the tables that exist."""
        rows = self.query("SELECT table_name FROM information_schema.tables WHERE table_schema = current_schema()")
        return {name for name in rows["table_name"] if "__" not in name} if rows.height else set()

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

    def describe(self) -> str:
        return masked(self.url)

    def _check_columns(self, table: str, columns: Columns, existing: Sequence[str] | None = None) -> None:
        existing = list(self.columns(table)) if existing is None else list(existing)
        if existing and existing != list(columns):
            raise WarehouseError(
                f"table {table} in {self.describe()} has columns {existing}; the platform writes {list(columns)}. "
                "Drop or rename the old table to let the platform recreate it."
            )


def _stored_elsewhere(warehouse: Warehouse, table: str, column: str, batch_id: str, part: str = "") -> pl.DataFrame:
    """(column, batch_id) of the other batches' rows of `table`; with `part`, a column `part` too, naming the table
    each row lies in, computed once per batch from `part` (an expression over `tableoid`)."""
    # One row per batch with its values in a list: a few rows cross the wire instead of one per encounter.
    grouped = (
        f"SELECT batch_id{', tableoid' if part else ''}, array_agg(CAST({quote(column)} AS BIGINT)) AS {quote(column)} "
        f"FROM {_checked(table)} WHERE batch_id <> $1 GROUP BY batch_id{', tableoid' if part else ''}"
    )
    found = warehouse.query(f"SELECT *, {part} AS part FROM ({grouped}) AS stored" if part else grouped, [batch_id])
    if not found.width:  # no table yet: nothing stored
        return pl.DataFrame(schema={column: pl.Int64, "batch_id": pl.String} | ({"part": pl.String} if part else {}))
    return found.explode(column).select(column, "batch_id", *(["part"] if part else []))


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

    @contextmanager
    def _transaction(self):
        with self._connected() as connection:
            connection.begin()
            try:
                yield connection
                connection.commit()
            except BaseException:
                connection.rollback()
                raise

    def _insert(self, connection, table: str, columns: Columns, frame: pl.DataFrame, where: str | None, params) -> None:
        existing = connection.execute(
            "SELECT column_name FROM information_schema.columns WHERE table_schema = current_schema() AND table_name = $1 "
            "ORDER BY ordinal_position",
            [table],
        ).fetchall()
        self._check_columns(table, columns, [name for (name,) in existing])
        connection.execute(table_ddl(table, columns))
        if where is not None:
            connection.execute(f"DELETE FROM {table} {where}", params)
        if frame.height:
            connection.register("incoming", frame.select(list(columns)).to_arrow())
            connection.execute(f"INSERT INTO {table} SELECT * FROM incoming")
            connection.unregister("incoming")

    @contextmanager
    def batch_writer(self, batch_id: str) -> Iterator[BatchWriter]:
        warehouse = self

        class _Writer(BatchWriter):
            def __init__(self) -> None:
                self.tables: dict[str, tuple[Columns, pl.DataFrame]] = {}

            def put(self, table, columns, frame):
                if table in self.tables:
                    raise WarehouseError(f"table {table} is put twice for batch {batch_id}")
                self.tables[_checked(table)] = (columns, frame.select(list(columns)))

            def discard(self, table):
                self.tables.pop(table, None)

            def stored_elsewhere(self, table, column):
                return _stored_elsewhere(warehouse, table, column, batch_id)

        # The block keeps the file open, and DuckDB lets one process at a time open it: what is read in the block
        # stays what is stored until the block writes.
        with nullcontext() if self._connection is not None else self:
            writer = _Writer()
            yield writer
            with self._transaction() as connection:
                for table, (columns, frame) in writer.tables.items():
                    self._insert(connection, table, columns, frame, "WHERE batch_id = $1", [batch_id])

    def _replace(self, table, columns, frame, *, keep):
        with self._transaction() as connection:
            self._insert(connection, table, columns, frame, None if keep else "", [])


class PostgresWarehouse(Warehouse):
    """A PostgreSQL database: reads through ADBC (Arrow), bulk loads by COPY through psycopg.

    A table written by batch is partitioned by `batch_id`, one partition per batch, so a batch is replaced by
    swapping a partition and read without scanning the others.
    """

    LOADERS = 3  # tables of a batch loaded side by side, each on a connection of its own
    CHUNK_ROWS = 4_000  # rows per COPY message: polars encodes the next while the server parses one

    # Connections are kept for the next use in this process (a run's steps share them) instead of paying for a new
    # one each time; a process keeps at most one reader and LOADERS + 1 writers, for one URL. One idle for longer
    # than TRUSTED_IDLE_SECONDS is checked first: the server may have closed it meanwhile (restart, dropped database).
    _idle: dict[str, tuple[Any, float]] = {}
    _idle_writers: dict[str, list[tuple[Any, float]]] = {}
    TRUSTED_IDLE_SECONDS = 5.0
    _writers_lock = threading.Lock()

    def __init__(self, url: str):
        self.url = url

    # -- connections ------------------------------------------------------------------------------------------------

    @contextmanager
    def _connect(self):
        import adbc_driver_postgresql.dbapi as adbc

        connection, since = self._idle.pop(self.url, (None, 0.0))
        for stale, _ in self._idle.values():
            stale.close()
        self._idle.clear()
        if connection is not None and time.monotonic() - since > self.TRUSTED_IDLE_SECONDS and not _alive(connection):
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
                self._idle[self.url] = (connection, time.monotonic())
            else:
                connection.close()

    @contextmanager
    def _writer(self, *, autocommit: bool = False):
        """A psycopg connection for loading, in UTC, taken from this process's idle ones or opened."""
        import psycopg

        with self._writers_lock:
            for url in [u for u in self._idle_writers if u != self.url]:
                for stale, _ in self._idle_writers.pop(url):
                    stale.close()
            idle = self._idle_writers.setdefault(self.url, [])
            connection, since = idle.pop() if idle else (None, 0.0)
        if connection is not None and time.monotonic() - since > self.TRUSTED_IDLE_SECONDS and not _writer_alive(connection):
            connection.close()
            connection = None
        if connection is None:
            try:
                connection = psycopg.connect(self.url, connect_timeout=10)
                connection.execute("SET TIME ZONE 'UTC'")
                connection.commit()
            except psycopg.Error as error:
                raise WarehouseError(f"cannot connect to {self.describe()}: {error}") from error
        connection.autocommit = autocommit
        healthy = False
        try:
            yield connection
            healthy = True
        finally:
            if healthy and connection.info.transaction_status == 0:
                with self._writers_lock:
                    idle = self._idle_writers.setdefault(self.url, [])
                    if len(idle) <= self.LOADERS:
                        idle.append((connection, time.monotonic()))
                        connection = None
            if connection is not None:
                connection.close()

    # -- reads ------------------------------------------------------------------------------------------------------

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

    def tables(self) -> set[str]:
        rows = self.query(
            "SELECT c.relname AS name FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE n.nspname = current_schema() AND c.relkind IN ('r', 'p') AND NOT c.relispartition"
        )
        return {name for name in rows["name"] if "__" not in name} if rows.height else set()

    def _kinds(self, tables: Sequence[str]) -> dict[str, str]:
        """relkind of each existing table: 'p' partitioned, 'r' plain."""
        placeholders = ", ".join(f"${i}" for i in range(1, len(tables) + 1))
        rows = self.query(
            "SELECT c.relname AS name, c.relkind::text AS kind FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
            f"WHERE n.nspname = current_schema() AND c.relname IN ({placeholders})",
            list(tables),
        )
        return dict(zip(rows["name"], rows["kind"])) if rows.height else {}

    # -- writes -----------------------------------------------------------------------------------------------------

    def _copy(self, connection, table: str, columns: Columns, frame: pl.DataFrame, *, freeze: bool = False) -> None:
        """Stream the frame into the table as CSV, a slice at a time (polars encodes while the server parses)."""
        names = ", ".join(quote(name) for name in columns)
        selected = frame.select(list(columns))
        with connection.cursor().copy(f"COPY {table} ({names}) FROM STDIN (FORMAT csv{', FREEZE' if freeze else ''})") as copy:
            for offset in range(0, selected.height, self.CHUNK_ROWS):
                copy.write(selected.slice(offset, self.CHUNK_ROWS).write_csv(include_header=False))

    def _replace(self, table, columns, frame, *, keep):
        kinds = self._kinds([table])
        if kinds.get(table) == "p":
            raise WarehouseError(f"table {table} in {self.describe()} is partitioned by batch; write it with replace_batch")
        self._check_columns(table, columns)
        with self._writer() as connection:
            try:
                connection.execute(table_ddl(table, columns))
                if not keep:
                    connection.execute(f"DELETE FROM {table}")
                if frame.height:
                    self._copy(connection, table, columns, frame)
                connection.commit()
            except BaseException:
                connection.rollback()
                raise

    @contextmanager
    def batch_writer(self, batch_id: str) -> Iterator[BatchWriter]:
        with self._writer(autocommit=True) as control, _PartitionSwap(self, control, batch_id) as swap:
            yield swap
            swap.publish()


# Session advisory locks, one per schema and name: writers in other schemas never wait for each other.
LOCK = "SELECT pg_advisory_{}(hashtextextended(current_schema() || ':' || %s, 0))"


def partition_prefix(table: str, batch_id: str) -> str:
    """How the partitions (and staging tables) of `table` for `batch_id` are named: the id's hash keeps the name short
    and a plain identifier; a token after it tells one write's table from another's."""
    return f"{table}__p{hashlib.blake2b(batch_id.encode(), digest_size=6).hexdigest()}_"


@dataclass
class _Staged:
    columns: Columns
    name: str | None  # the staging table; None when the batch has no rows in this table
    loads: list[Future] = field(default_factory=list)
    values: pl.Series | None = None  # the rows' values of the column that must stay unique, if any


class _PartitionSwap(BatchWriter):
    """Write-then-swap of one batch's partitions on PostgreSQL.

    Each table put with rows gets a staging table, loaded at once by a loader thread on a connection of its own
    (COPY FREEZE into a table made in the same transaction), so the tables of a batch load side by side and each
    starts as soon as it is put. `publish` then, in one transaction, creates missing parent tables, drops the batch's
    old partitions and attaches the staged tables as its new ones. A session advisory lock per batch keeps two writers
    of one batch apart, and lets a writer drop what a crashed one left staged.
    """

    def __init__(self, warehouse: PostgresWarehouse, control, batch_id: str) -> None:
        self.warehouse, self.control, self.batch_id = warehouse, control, batch_id
        self.staged: dict[str, _Staged] = {}
        self.token = secrets.token_hex(4)
        self.unique: dict[str, tuple[str, set[str]]] = {}  # table → (column, the partitions read for it)

    def __enter__(self) -> _PartitionSwap:
        self.loaders = ThreadPoolExecutor(self.warehouse.LOADERS, thread_name_prefix="warehouse-loader")
        self.control.execute(LOCK.format("lock"), [f"batch:{self.batch_id}"])
        return self

    def __exit__(self, exc_type, *_) -> None:
        try:
            if exc_type is not None:
                for staged in self.staged.values():
                    for load in staged.loads:
                        load.cancel()
            self.loaders.shutdown(wait=True)
            if exc_type is not None:
                self._drop_unattached(list(self.staged))
        finally:
            try:
                self.control.execute(LOCK.format("unlock"), [f"batch:{self.batch_id}"])
            except Exception:
                if exc_type is None:  # else the failure that got here is the one to tell; the session ends with it
                    raise

    def _prefixes(self, tables: Sequence[str]) -> list[str]:
        """LIKE patterns of the tables' partitions and staging tables for this batch."""
        return [partition_prefix(table, self.batch_id).replace("_", r"\_") + "%" for table in tables]

    def _drop_unattached(self, tables: Sequence[str]) -> None:
        """Drop this batch's staging tables that are not attached: this writer's after a failure, or a crashed one's."""
        rows = self.control.execute(
            "SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE n.nspname = current_schema() AND c.relkind = 'r' AND NOT c.relispartition AND c.relname LIKE ANY(%s)",
            [self._prefixes(tables)],
        ).fetchall()
        for (name,) in rows:
            self.control.execute(f"DROP TABLE IF EXISTS {name}")

    def put(self, table: str, columns: Columns, frame: pl.DataFrame) -> None:
        _checked(table)
        if table in self.staged:
            raise WarehouseError(f"table {table} is put twice for batch {self.batch_id}")
        incoming = frame.select(list(columns))  # a missing column fails here, before anything is loaded
        staged = self.staged[table] = _Staged(columns, None)
        if table in self.unique:
            values = incoming[self.unique[table][0]]
            values = values.str.strip_chars() if values.dtype == pl.String else values
            staged.values = values.cast(pl.Int64, strict=False).drop_nulls()
        if incoming.height:
            staged.name = partition_prefix(table, self.batch_id) + self.token
            staged.loads.append(self.loaders.submit(self._load, staged.name, columns, incoming))

    def discard(self, table: str) -> None:
        staged = self.staged.pop(table, None)
        if staged is None:
            return
        for load in staged.loads:
            if not load.cancel():
                load.exception()  # wait for it; a failed load of a table taken back fails nothing
        if staged.name is not None:
            self.control.execute(f"DROP TABLE IF EXISTS {staged.name}")

    def stored_elsewhere(self, table: str, column: str) -> pl.DataFrame:
        found = _stored_elsewhere(self.warehouse, table, column, self.batch_id, part="tableoid::regclass::text")
        self.unique[table] = (column, set(found["part"]))
        return found.drop("part")

    def _conflicts(self) -> list[str]:
        """Under the table's lock: values put for a unique table that a batch stored after they were read."""
        found = []
        for table, (column, seen) in self.unique.items():
            staged = self.staged.get(table)
            if staged is None or staged.values is None:
                continue
            self.control.execute("SELECT pg_advisory_xact_lock(hashtextextended(current_schema() || ':unique:' || %s, 0))", [table])
            partitions = self.control.execute(
                "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid WHERE i.inhparent = to_regclass(%s)",
                [table],
            ).fetchall()
            own = partition_prefix(table, self.batch_id)
            for (partition,) in partitions:
                if partition in seen or partition.startswith(own):
                    continue
                # A partition attached since: compare its values with ours here, whatever plan the server would pick.
                for batch, values in self.control.execute(
                    f"SELECT batch_id, array_agg(CAST({quote(column)} AS BIGINT)) FROM {partition} GROUP BY batch_id"
                ).fetchall():
                    clash = staged.values.filter(staged.values.is_in(pl.Series(values, dtype=pl.Int64).implode()))
                    found += [f"{table}.{column} {value} (stored meanwhile by batch {batch})" for value in clash.head(5)]
        return found

    def _load(self, staging: str, columns: Columns, rows: pl.DataFrame) -> None:
        # The check lets ATTACH PARTITION trust the rows instead of scanning them; it also holds for the defaults.
        check = f"CONSTRAINT {staging}_batch CHECK (batch_id IS NOT NULL AND batch_id = {literal(self.batch_id)})"
        # A column with one value in every row (batch_id, the file, the time of ingestion) is the staging table's
        # default instead of text sent and parsed row by row.
        constants = _constants(rows)
        if len(constants) == len(columns):  # COPY needs a column to count the rows by
            constants.pop(next(iter(columns)))
        sent = {name: dtype for name, dtype in columns.items() if name not in constants}
        with self.warehouse._writer() as connection:
            try:
                # Staged rows count only once the swap commits, and that commit waits for the log to reach the disk.
                connection.execute("SET LOCAL synchronous_commit = off")
                # FREEZE: a table made in the same transaction takes its rows frozen, so no later read rewrites them.
                connection.execute(f"CREATE TABLE {staging} ({_body(columns, constants)}, {check})")
                self.warehouse._copy(connection, staging, sent, rows, freeze=True)
                connection.commit()
            except BaseException:
                connection.rollback()
                raise

    def publish(self) -> None:
        if not self.staged:
            return
        tables = list(self.staged)
        # The tables' shape and the batch's current partitions are read while the loads run: they do not depend on them.
        found = self.control.execute(
            "SELECT c.relname, c.relkind::text, c.relispartition, a.attname FROM pg_class c "
            "JOIN pg_namespace n ON n.oid = c.relnamespace "
            "LEFT JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped AND NOT c.relispartition "
            "WHERE n.nspname = current_schema() AND (c.relname = ANY(%s) OR c.relname LIKE ANY(%s)) "
            "ORDER BY c.relname, a.attnum",
            [tables, self._prefixes(tables)],
        ).fetchall()
        parents = {name: kind for name, kind, _, _ in found if name in self.staged}
        ours = {staged.name for staged in self.staged.values()}
        # The batch's current partitions, and what a crashed writer of it left staged: all replaced by ours.
        replaced = sorted({name for name, _, _, _ in found if name not in self.staged and name not in ours})
        for table, staged in self.staged.items():
            if parents.get(table) == "r":
                raise WarehouseError(
                    f"table {table} in {self.warehouse.describe()} is not partitioned by batch_id, as this version writes "
                    f"it; drop it (DROP TABLE {table}) and materialize its batches again"
                )
            self.warehouse._check_columns(table, staged.columns, [column for name, _, _, column in found if name == table])
        for staged in self.staged.values():
            for load in staged.loads:
                load.result()  # the first failed load fails the batch, before anything is swapped
        swap = []
        for table, staged in self.staged.items():
            prefix = partition_prefix(table, self.batch_id)
            if table not in parents:
                swap.append(f"CREATE TABLE IF NOT EXISTS {table} ({_body(staged.columns)}) PARTITION BY LIST (batch_id)")
            swap += [f"DROP TABLE {name}" for name in replaced if name.startswith(prefix)]
            if staged.name is not None:
                swap.append(f"ALTER TABLE {table} ATTACH PARTITION {staged.name} FOR VALUES IN ({literal(self.batch_id)})")
        with self.control.transaction():
            if conflicts := self._conflicts():
                raise ConflictingWrite(f"batch {self.batch_id} was not written: {'; '.join(conflicts)}")
            self.control.execute(";\n".join(swap))  # one round trip
        self.staged.clear()


def _writer_alive(connection) -> bool:
    try:
        if connection.closed or connection.info.transaction_status != 0:
            return False
        connection.execute("SELECT 1")
        if not connection.autocommit:
            connection.commit()
        return True
    except Exception:
        return False


def _alive(connection) -> bool:
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
