"""The DuckDB warehouse: one file, written by one process at a time, a batch's tables replaced in one transaction."""

from __future__ import annotations

import os
import random
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow as pa

from readmission_platform.lib.warehouse.base import (
    BatchWriter,
    Columns,
    Warehouse,
    WarehouseError,
    checked,
    literal,
    stored_elsewhere,
    table_ddl,
)

# DuckDB compresses and writes an insert's rows to the file during the INSERT only once they fill a row group; rows
# that fill none wait for the commit, which then compresses them on the committing thread, after the pass has
# computed everything. Row groups smaller than a batch move that work into the loader thread, while the pass computes
# the next stage, and leave the commit little more than the WAL's pointers to the blocks already written.
ROW_GROUP_SIZE = 4_096
# Rows reach DuckDB in Arrow batches of two row groups each: an INSERT of one batch's table then keeps more than one
# of DuckDB's threads filling and compressing groups, where with groups as large as the Arrow batches it kept one
# (measured in benchmarks/README.md, with the file's size and read time beside).
ARROW_BATCH_ROWS = 2 * ROW_GROUP_SIZE
ALIAS = "warehouse"


class _Attached:
    """The process's one in-memory DuckDB, which attaches the file while anything uses it; connections are its cursors.

    DuckDB takes the row group size only when a file is attached, and refuses to attach one file twice in a process.
    The instance lives as long as the process (starting one costs ten times what attaching a file does); the file is
    detached when its last connection closes, so another process can take the lock.
    """

    _host: Any = None
    _host_pid = 0
    _open: dict[Path, tuple[str, int]] = {}  # path → (its alias in the instance, connections using it)
    _attached = 0
    _lock = threading.Lock()

    @classmethod
    @contextmanager
    def cursor(cls, path: Path, lock_wait_seconds: float):
        with cls._lock:
            cls._start()
            alias, users = cls._open.get(path, ("", 0))
            if not users:
                alias = cls._attach(path, lock_wait_seconds)
            cls._open[path] = (alias, users + 1)
        try:
            cursor = cls._host.cursor()
            try:
                cursor.execute(f"USE {alias}")
                # Timestamps then read back as UTC, as written and as PostgreSQL returns them, not in the host's zone.
                cursor.execute("SET TimeZone = 'UTC'")
                yield cursor
            finally:
                cursor.close()
        finally:
            with cls._lock:
                alias, users = cls._open.pop(path)
                if users > 1:
                    cls._open[path] = (alias, users - 1)
                else:
                    cls._host.execute(f"DETACH {alias}")

    @classmethod
    def alias(cls, path: Path) -> str:
        return cls._open[path][0]

    @classmethod
    def _start(cls) -> None:
        import duckdb

        # An instance inherited through fork is not safe to use, nor are its files': the child starts its own.
        if cls._host is None or cls._host_pid != os.getpid():
            # A filled row group is written at once instead of after four more (the default buffers five), so a
            # batch's groups are written during its INSERT. Four threads on two cores: the batch's groups are filled
            # and compressed by threads of their own while the pass keeps its core, and on a shared machine the load
            # waits less for a core (measured in benchmarks/README.md).
            cls._host = duckdb.connect(config={"threads": 4, "write_buffer_row_group_count": 1})
            cls._host_pid = os.getpid()
            cls._open = {}

    @classmethod
    def _attach(cls, path: Path, lock_wait_seconds: float) -> str:
        import duckdb

        path.parent.mkdir(parents=True, exist_ok=True)
        cls._attached += 1
        alias = f"{ALIAS}_{cls._attached}"
        deadline = time.monotonic() + lock_wait_seconds
        while True:
            try:
                cls._host.execute(f"ATTACH {literal(str(path))} AS {alias} (ROW_GROUP_SIZE {ROW_GROUP_SIZE})")
                return alias
            except duckdb.IOException as error:
                if "lock" not in str(error).lower() or time.monotonic() > deadline:
                    raise WarehouseError(f"cannot open {path}: {error}") from error
                time.sleep(random.uniform(0.05, 0.3))


class DuckDBWarehouse(Warehouse):
    """A DuckDB file. DuckDB admits one writing process; a second one waits here for the lock."""

    LOCK_WAIT_SECONDS = 120.0

    def __init__(self, path: Path):
        self.path = Path(path)
        self.url = f"duckdb:///{self.path}"

    def _connect(self):
        return _Attached.cursor(self.path.absolute(), self.LOCK_WAIT_SECONDS)

    def query(self, sql: str, params=()) -> pl.DataFrame:
        import duckdb

        if not self.path.exists():  # no table yet: a read makes neither the file nor its folder
            return pl.DataFrame()
        with self._connected() as connection:
            try:
                return pl.from_arrow(connection.sql(sql, params=list(params) or None).to_arrow_table())
            except duckdb.CatalogException as error:
                if "does not exist" in str(error):
                    return pl.DataFrame()
                raise

    def _insert(self, connection, table: str, columns: Columns, rows: pa.Table, where: str | None, params) -> None:
        """Insert `rows` (`arrow_rows`) into `table`, created from `columns` if missing, after deleting `where`."""
        # duckdb_columns() rather than the information_schema view over it, whose binding costs tens of milliseconds.
        existing = connection.execute(
            "SELECT column_name FROM duckdb_columns() WHERE database_name = current_database() "
            "AND schema_name = current_schema() AND table_name = $1 ORDER BY column_index",
            [table],
        ).fetchall()
        self._check_columns(table, columns, [name for (name,) in existing])
        if not existing:
            connection.execute(table_ddl(table, columns))
        elif where is not None:
            connection.execute(f"DELETE FROM {table} {where}", params)
        if rows.num_rows:
            connection.register("incoming", rows)
            connection.execute(f"INSERT INTO {table} SELECT * FROM incoming")
            connection.unregister("incoming")

    @contextmanager
    def batch_writer(self, batch_id: str) -> Iterator[BatchWriter]:
        # The block keeps the file open, and DuckDB lets one process at a time open it: what is read in the block
        # stays what is stored until the block writes.
        with nullcontext() if self._connection is not None else self:
            with _Load(self, batch_id) as load:
                yield load
                load.commit()

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

    def _replace(self, table, columns, frame, *, keep):
        with self._transaction() as connection:
            self._insert(connection, table, columns, arrow_rows(frame, columns), None if keep else "", [])


def arrow_rows(frame: pl.DataFrame, columns: Columns) -> pa.Table:
    """The frame's `columns` as DuckDB inserts them fastest: one Arrow batch per two row groups."""
    # Arrow's string views are polars' own strings and DuckDB's layout: no copy into offsets and bytes first. Arrow
    # batches of whole row groups: DuckDB's threads then each fill and compress groups of their own, where the frame's
    # own chunks, which fill none, were gathered into groups again before they were written.
    incoming = frame.select(list(columns)).rechunk().to_arrow(compat_level=pl.CompatLevel.newest())
    return pa.Table.from_batches(incoming.to_batches(max_chunksize=ARROW_BATCH_ROWS), schema=incoming.schema)


class _Load(BatchWriter):
    """One transaction on a cursor of its own, fed by a loader thread: each table is inserted as soon as it is put,
    while the pass computes the next stage (DuckDB lets go of the GIL while it inserts). The loader's inserts are
    the pass's longest wait, so a table is made Arrow batches on the pass's thread, in `put`.

    A table taken back after it was inserted makes the commit start the transaction again with the tables kept.
    """

    def __init__(self, warehouse: DuckDBWarehouse, batch_id: str) -> None:
        self.warehouse, self.batch_id = warehouse, batch_id
        self.tables: dict[str, tuple[Columns, pa.Table]] = {}
        self.loads: list[Future] = []
        self.retaken = False

    def __enter__(self) -> _Load:
        self.connection = self.warehouse._connection.cursor()
        self.connection.execute(f"USE {_Attached.alias(self.warehouse.path.absolute())}")
        self.connection.begin()
        self.loader = ThreadPoolExecutor(1, thread_name_prefix="warehouse-loader")
        return self

    def __exit__(self, exc_type, *_) -> None:
        import duckdb

        try:
            self.loader.shutdown(wait=True, cancel_futures=exc_type is not None)
            if exc_type is not None:
                self.connection.rollback()
        except duckdb.TransactionException:
            pass  # a commit that failed has already rolled the transaction back
        finally:
            self.connection.close()

    def _insert(self, table: str, columns: Columns, rows: pa.Table) -> None:
        self.warehouse._insert(self.connection, table, columns, rows, "WHERE batch_id = $1", [self.batch_id])

    def put(self, table, columns, frame):
        if table in self.tables:
            raise WarehouseError(f"table {table} is put twice for batch {self.batch_id}")
        self.tables[checked(table)] = (columns, arrow_rows(frame, columns))
        self.loads.append(self.loader.submit(self._insert, table, *self.tables[table]))

    def discard(self, table):
        if self.tables.pop(table, None) is not None:
            self.retaken = True

    def stored_elsewhere(self, table, column, *, text=False):
        return stored_elsewhere(self.warehouse, table, column, self.batch_id, text=text)

    def commit(self) -> None:
        for load in self.loads:
            load.result()  # the first failed insert fails the batch; __exit__ rolls back
        if self.retaken:
            self.connection.rollback()
            self.connection.begin()
            for table, (columns, rows) in self.tables.items():
                self._insert(table, columns, rows)
        self.connection.commit()
