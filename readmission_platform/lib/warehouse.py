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
    def exclusive(self, name: str) -> Iterator[None]:
        """A context manager: no other writer holding `name` runs in the block (across processes)."""

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

    def shape_problems(self, table: str, columns: Columns, batch_id: str) -> tuple[list[str], int]:
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

    def _check_columns(self, table: str, columns: Columns, existing: Sequence[str] | None = None) -> None:
        existing = list(self.columns(table)) if existing is None else list(existing)
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
    def exclusive(self, name: str) -> Iterator[None]:
        # The block keeps the file open, and DuckDB lets one process at a time open it for writing.
        if self._connection is not None:
            yield
        else:
            with self:
                yield

    @contextmanager
    def batch_writer(self, batch_id: str) -> Iterator[BatchWriter]:
        warehouse = self

        class _Writer(BatchWriter):
            def put(self, table, columns, frame):
                warehouse._insert(connection, _checked(table), columns, frame, "WHERE batch_id = $1", [batch_id])

        with self._transaction() as connection:
            yield _Writer()

    def _replace(self, table, columns, frame, *, keep):
        with self._transaction() as connection:
            self._insert(connection, table, columns, frame, None if keep else "", [])


class PostgresWarehouse(Warehouse):
    """A PostgreSQL database: reads through ADBC (Arrow), bulk loads by COPY through psycopg.

    A table written by batch is partitioned by `batch_id`, one partition per batch, so a batch is replaced by
    swapping a partition and read without scanning the others.
    """

    LOADERS = 3  # chunks of a batch's tables loaded side by side, each on a connection of its own
    CHUNK_ROWS = 4_000  # rows per loaded chunk, and per COPY message of a table written whole

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
    def exclusive(self, name: str) -> Iterator[None]:
        with self._writer(autocommit=True) as connection:
            connection.execute(LOCK.format("lock"), [name])
            try:
                yield
            finally:
                connection.execute(LOCK.format("unlock"), [name])

    @contextmanager
    def batch_writer(self, batch_id: str) -> Iterator[BatchWriter]:
        with self._writer(autocommit=True) as control, _PartitionSwap(self, control, batch_id) as swap:
            yield swap
            swap.publish()


# Session advisory locks, one per schema and name: writers in other schemas never wait for each other.
LOCK = "SELECT pg_advisory_{}(hashtextextended(current_schema() || ':' || %s, 0))"


def partition_name(table: str, batch_id: str) -> str:
    """The partition of `table` holding `batch_id`: the id's hash keeps the name short and a plain identifier."""
    return f"{table}__p{hashlib.blake2b(batch_id.encode(), digest_size=6).hexdigest()}"


class _PartitionSwap(BatchWriter):
    """Write-then-swap of one batch's partitions on PostgreSQL.

    Each table put gets a staging table of its own, and its rows are cut into chunks that the loader threads COPY in,
    each on its connection: several chunks, of one table or of several, load at once, and loading starts as soon as a
    table is put. `publish` then, in one transaction, creates missing parent tables, drops the batch's old partitions
    and attaches the staged ones. A session advisory lock per batch keeps two writers of one batch apart, and lets a
    writer drop what a crashed one left staged.
    """

    def __init__(self, warehouse: PostgresWarehouse, control, batch_id: str) -> None:
        self.warehouse, self.control, self.batch_id = warehouse, control, batch_id
        self.staged: dict[str, tuple[Columns, str, list[Future]]] = {}
        self.token = secrets.token_hex(4)

    def __enter__(self) -> _PartitionSwap:
        self.loaders = ThreadPoolExecutor(self.warehouse.LOADERS, thread_name_prefix="warehouse-loader")
        self.control.execute(LOCK.format("lock"), [f"batch:{self.batch_id}"])
        self._drop_leftovers()
        return self

    def __exit__(self, exc_type, *_) -> None:
        try:
            if exc_type is not None:
                for _, _, futures in self.staged.values():
                    for future in futures:
                        future.cancel()
            self.loaders.shutdown(wait=True)
            if exc_type is not None:
                self._drop_leftovers()
        finally:
            self.control.execute(LOCK.format("unlock"), [f"batch:{self.batch_id}"])

    def _staging_prefix(self, table: str) -> str:
        return partition_name(table, self.batch_id).replace("__p", "__s", 1) + "_"

    def _drop_leftovers(self) -> None:
        """Drop staging tables of this batch that are not attached: a failed or crashed writer's."""
        rows = self.control.execute(
            "SELECT tablename FROM pg_tables WHERE schemaname = current_schema() AND tablename ~ %s",
            [r"__s[0-9a-f]{12}_[0-9a-f]{8}$"],
        ).fetchall()
        prefixes = tuple(self._staging_prefix(table) for table in {name.split("__")[0] for (name,) in rows})
        for (name,) in rows:
            if name.startswith(prefixes):
                self.control.execute(f"DROP TABLE IF EXISTS {name}")

    def put(self, table: str, columns: Columns, frame: pl.DataFrame) -> None:
        _checked(table)
        if table in self.staged:
            raise WarehouseError(f"table {table} is put twice for batch {self.batch_id}")
        incoming = frame.select(list(columns))  # a missing column fails here, before anything is loaded
        staging = self._staging_prefix(table) + self.token
        self.staged[table] = (columns, staging, [self.loaders.submit(self._load, staging, columns, incoming)])

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
        # The shape of the tables is checked while the loads run: it does not depend on them.
        found = self.control.execute(
            "SELECT c.relname, c.relkind::text, a.attname FROM pg_class c "
            "JOIN pg_namespace n ON n.oid = c.relnamespace "
            "JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped "
            "WHERE n.nspname = current_schema() AND c.relname = ANY(%s) ORDER BY c.relname, a.attnum",
            [list(self.staged)],
        ).fetchall()
        for table, (columns, _, _) in self.staged.items():
            if any(name == table and kind == "r" for name, kind, _ in found):
                raise WarehouseError(
                    f"table {table} in {self.warehouse.describe()} is not partitioned by batch_id, as this version writes "
                    f"it; drop it (DROP TABLE {table}) and materialize its batches again"
                )
            self.warehouse._check_columns(table, columns, [column for name, _, column in found if name == table])
        for _, _, futures in self.staged.values():
            for future in futures:
                future.result()  # the first failed load fails the batch, before anything is swapped
        swap = []
        for table, (columns, staging, _) in self.staged.items():
            partition = partition_name(table, self.batch_id)
            swap += [
                f"CREATE TABLE IF NOT EXISTS {table} ({_body(columns)}) PARTITION BY LIST (batch_id)",
                f"DROP TABLE IF EXISTS {partition}",
                f"ALTER TABLE {staging} RENAME TO {partition}",
                f"ALTER TABLE {table} ATTACH PARTITION {partition} FOR VALUES IN ({literal(self.batch_id)})",
            ]
        with self.control.transaction():
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
