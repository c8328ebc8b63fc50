"""The PostgreSQL warehouse: every table written by batch is partitioned by `batch_id`.

Each table's new rows are streamed by COPY into a staging table of their own, several tables at once on separate
connections of a psycopg_pool pool, and one short transaction then swaps the staged tables in for the batch's old
partitions. A failure before that swap leaves every stored row as it was.
"""

from __future__ import annotations

import hashlib
import secrets
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import polars as pl

from readmission_platform.lib.warehouse.base import (
    SQL_TYPES,
    BatchWriter,
    Columns,
    ConflictingWrite,
    Warehouse,
    WarehouseError,
    body,
    checked,
    literal,
    polars_kind,
    quote,
    sql_kind,
    stored_elsewhere,
    table_ddl,
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


class PostgresWarehouse(Warehouse):
    """A PostgreSQL database: reads through ADBC (Arrow), bulk loads by COPY through psycopg.

    A table written by batch is partitioned by `batch_id`, one partition per batch, so a batch is replaced by
    swapping a partition and read without scanning the others.
    """

    LOADERS = 3  # tables of a batch loaded side by side, each on a connection of its own
    CHUNK_ROWS = 4_000  # rows per COPY message: polars encodes the next while the server parses one
    CONNECT_SECONDS = 10.0

    # Connections are kept for the next use in this process (a run's steps share them) instead of paying for a new
    # one each time: one reader (ADBC, which has no pool) and a pool of LOADERS + 1 writers, for the latest URL only
    # (tests use a schema each). A reader idle for longer than TRUSTED_IDLE_SECONDS is checked first: the server may
    # have closed it meanwhile (restart, dropped database); the pool checks each writer it hands out.
    _idle: dict[str, tuple[Any, float]] = {}
    TRUSTED_IDLE_SECONDS = 5.0
    _pools: dict[str, Any] = {}
    _pools_lock = threading.Lock()

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

    def _pool(self):
        from psycopg_pool import ConnectionPool

        with self._pools_lock:
            pool = self._pools.get(self.url)
            if pool is None:
                for stale in self._pools.values():
                    stale.close()
                self._pools.clear()
                pool = self._pools[self.url] = ConnectionPool(
                    self.url,
                    min_size=0,
                    max_size=self.LOADERS + 1,
                    kwargs={"connect_timeout": int(self.CONNECT_SECONDS)},
                    configure=_in_utc,
                    check=ConnectionPool.check_connection,
                    timeout=self.CONNECT_SECONDS,
                    name="warehouse-writers",
                    open=True,
                )
            return pool

    @contextmanager
    def _writer(self, *, autocommit: bool = False):
        """A psycopg connection for loading, in UTC, from this process's pool."""
        from psycopg_pool import PoolTimeout

        pool = self._pool()
        try:
            connection = pool.getconn()
        except PoolTimeout as error:
            raise WarehouseError(f"cannot connect to {self.describe()}: {error}") from error
        try:
            connection.autocommit = autocommit
            yield connection
        finally:
            pool.putconn(connection)  # a connection left in a transaction is rolled back, a broken one discarded

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

    @contextmanager
    def _transaction(self):
        with self._writer() as connection:
            try:
                yield connection
                connection.commit()
            except BaseException:
                connection.rollback()
                raise

    def _replace(self, table, columns, frame, *, keep):
        kinds = self._kinds([table])
        if kinds.get(table) == "p":
            raise WarehouseError(f"table {table} in {self.describe()} is partitioned by batch; write it with replace_batch")
        self._check_columns(table, columns)
        with self._transaction() as connection:
            connection.execute(table_ddl(table, columns))
            if not keep:
                connection.execute(f"DELETE FROM {table}")
            if frame.height:
                self._copy(connection, table, columns, frame)

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
        self.unique: dict[str, tuple[str, bool, set[str]]] = {}  # table → (column, as text, the partitions read for it)

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
        checked(table)
        if table in self.staged:
            raise WarehouseError(f"table {table} is put twice for batch {self.batch_id}")
        incoming = frame.select(list(columns))  # a missing column fails here, before anything is loaded
        staged = self.staged[table] = _Staged(columns, None)
        if table in self.unique:
            column, text, _ = self.unique[table]
            values = incoming[column]
            if not text:
                values = values.str.strip_chars() if values.dtype == pl.String else values
            staged.values = values.cast(polars_kind(text), strict=False).drop_nulls()
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

    def stored_elsewhere(self, table: str, column: str, *, text: bool = False) -> pl.DataFrame:
        found = stored_elsewhere(self.warehouse, table, column, self.batch_id, part="tableoid::regclass::text", text=text)
        self.unique[table] = (column, text, set(found["part"]))
        return found.drop("part")

    def _conflicts(self) -> list[str]:
        """Under the table's lock: values put for a unique table that a batch stored after they were read."""
        found = []
        for table, (column, text, seen) in self.unique.items():
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
                    f"SELECT batch_id, array_agg(CAST({quote(column)} AS {sql_kind(text)})) FROM {partition} GROUP BY batch_id"
                ).fetchall():
                    clash = staged.values.filter(staged.values.is_in(pl.Series(values, dtype=polars_kind(text)).implode()))
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
                connection.execute(f"CREATE TABLE {staging} ({body(columns, constants)}, {check})")
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
                swap.append(f"CREATE TABLE IF NOT EXISTS {table} ({body(staged.columns)}) PARTITION BY LIST (batch_id)")
            swap += [f"DROP TABLE {name}" for name in replaced if name.startswith(prefix)]
            if staged.name is not None:
                swap.append(f"ALTER TABLE {table} ATTACH PARTITION {staged.name} FOR VALUES IN ({literal(self.batch_id)})")
        with self.control.transaction():
            if conflicts := self._conflicts():
                raise ConflictingWrite(f"batch {self.batch_id} was not written: {'; '.join(conflicts)}")
            self.control.execute(";\n".join(swap))  # one round trip
        self.staged.clear()


def _alive(connection) -> bool:
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
            cursor.fetchall()
        connection.commit()
        return True
    except Exception:
        return False


def _in_utc(connection) -> None:
    connection.execute("SET TIME ZONE 'UTC'")
    connection.commit()
