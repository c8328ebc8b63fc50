"""Every prediction, written in the background to SQLite (default) or PostgreSQL, without making inference wait.

`PredictionLog.record` (or `record_frame`, for a batch) puts rows on a bounded queue and returns at once; a writer
thread takes them off in batches and inserts each batch in one transaction: into SQLite through ADBC, bound outside
the write lock and copied in under it (`sqlite_predictions`), into PostgreSQL by COPY. When the queue is full the rows
are dropped and counted (`dropped`), so overload slows nothing down and loses nothing silently. `close` drains the
queue, so a clean stop loses nothing.

A row holds the prediction and the encounter's fields as sent, one typed column each, named as the data set names
them (`A1Cresult`, `glyburide-metformin`): the request model refuses the data set's identifiers, and of a request's
`patient_id` only its keyed hash is stored (`patient_key`), so no patient identifier is.
A table made before the rollout columns (stage, shadow_version, shadow_probability, candidate_error, candidate_ms) or
`patient_key` gets them added (ALTER TABLE … ADD COLUMN), its rows NULL there. A table of another layout (an earlier version's kept the
fields as one JSON text) is renamed, with its rows, to `predictions_until_<UTC time>`, and a new one is made. The log is
read back by `lib/predictions.read_predictions`.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import adbc_driver_sqlite.dbapi
import polars as pl
import psycopg
import pyarrow as pa
import sqlalchemy as sa
from adbc_driver_manager import Error as AdbcError
from sqlalchemy.dialects import sqlite as sqlite_dialect

from readmission_platform.lib import schema
from readmission_platform.lib.encounter import FIELDS, REQUEST_DTYPES
from readmission_platform.lib.predictions import PATIENT_KEY, RESULT_TYPES, TABLE, TYPES
from readmission_platform.lib.reporting import masked
from readmission_platform.lib.warehouse import quote

log = logging.getLogger(__name__)

RESULT_COLUMNS = tuple(RESULT_TYPES)
COLUMNS = tuple(TYPES)
_INTEGER_FIELDS = frozenset(name for name, dtype in REQUEST_DTYPES.items() if dtype.is_integer())
# The columns as they are handed to the database: the time as UTC text, for SQLite as SQLAlchemy stores a DateTime
# there (without the offset), and there the decision as 0 or 1.
_POSTGRES_TYPES = TYPES | {"predicted_at": pl.String()}
_SQLITE_TYPES = _POSTGRES_TYPES | {"decision": pl.Int64()}
# (polars' formats: `%.6f` is a dot and the microseconds.)
_SQLITE_TIME, _POSTGRES_TIME = "%Y-%m-%d %H:%M:%S%.6f", "%Y-%m-%d %H:%M:%S%.6f+00:00"


def _columns() -> list[sa.Column]:
    return [
        sa.Column("request_id", sa.String(128), nullable=False),
        sa.Column("predicted_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("endpoint", sa.String(32), nullable=False),
        sa.Column("model_name", sa.String(128), nullable=False),
        sa.Column("model_version", sa.String(32), nullable=False),
        sa.Column("probability", sa.Float(), nullable=False),
        sa.Column("decision", sa.Boolean(), nullable=False),
        sa.Column("risk_band", sa.String(16), nullable=False),
        # The encounter's fields, typed as the request model validated them. One JSON text of them cost as much to
        # encode as the rest of a batch's log row, and took 3.5 times the bytes on disk.
        *(
            sa.Column(name, sa.Integer() if name in _INTEGER_FIELDS else sa.Text(), nullable=schema.CLEAN_BY_NAME[name].nullable)
            for name in FIELDS
        ),
        *_added_columns(),
    ]


def _rollout_columns() -> list[sa.Column]:
    """The columns of a rollout (issue 15), last: a log made before them gets them by ALTER TABLE … ADD COLUMN, at
    the end, so old and new tables keep one column order (SQLite copies staged rows in by position)."""
    return [
        sa.Column("stage", sa.String(16), nullable=True),  # NULL in rows from before: production answered them
        sa.Column("shadow_version", sa.String(32), nullable=True),
        sa.Column("shadow_probability", sa.Float(), nullable=True),
        sa.Column("candidate_error", sa.Text(), nullable=True),
        sa.Column("candidate_ms", sa.Float(), nullable=True),
    ]


ROLLOUT_COLUMNS = tuple(column.name for column in _rollout_columns())


def _added_columns() -> list[sa.Column]:
    """The columns added to the first layout, in the order they were added: a log lacking some gets them at the end."""
    # The keyed hash of the request's patient_id (never the identifier), so an outcome of the request can bring that
    # patient's history up to date (`lib/history.keyed_states`).
    return [*_rollout_columns(), sa.Column(PATIENT_KEY, sa.String(64), nullable=True)]


ADDED_COLUMNS = tuple(column.name for column in _added_columns())


_metadata = sa.MetaData()
predictions = sa.Table(TABLE, _metadata, sa.Column("id", sa.BigInteger(), primary_key=True, autoincrement=True), *_columns())
# Rows are appended in time order, so `id` orders them by time too. PostgreSQL gets a BRIN index on the time, which
# appends nearly for free, and one on the version.
sa.Index("predictions_predicted_at", predictions.c.predicted_at, postgresql_using="brin").ddl_if(dialect="postgresql")
sa.Index("predictions_model_version", predictions.c.model_version).ddl_if(dialect="postgresql")
# SQLite: the table's own rowid is the id, and there is no other index (on the hot path each would cost a third of an
# insert). Without a column of its own for the id, a batch staged in a temporary table of the same columns is copied
# in under the write lock record by record, as stored, without decoding (SQLite's transfer optimization), a small
# fraction of what binding them from Arrow takes. Loaded workers whose lock covered the binding fell behind
# (benchmarks/README.md).
_sqlite_metadata = sa.MetaData()
sqlite_predictions = sa.Table(TABLE, _sqlite_metadata, *_columns())
_STAGED = f"{TABLE}_staged"
_CREATE_STAGED = str(
    sa.schema.CreateTable(sa.Table(_STAGED, sa.MetaData(), *_columns(), prefixes=["TEMPORARY"]), if_not_exists=True)
    .compile(dialect=sqlite_dialect.dialect())
)


def _table(engine: sa.Engine) -> sa.Table:
    return sqlite_predictions if engine.dialect.name == "sqlite" else predictions


def engine_for(url: str, *, create: bool = True) -> sa.Engine:
    """An engine on `url` (sqlite:///path or postgresql://…), with the table created if missing (`create`)."""
    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        engine = sa.create_engine(url, connect_args={"timeout": 30})

        @sa.event.listens_for(engine, "connect")
        def _wal(connection, _record) -> None:  # several workers append to one file
            # Large pages keep a row of about 1 KB (the inputs) on its page; the size only counts for a new file.
            connection.execute("PRAGMA page_size=65536")
            connection.execute("PRAGMA journal_mode=WAL")
            connection.execute("PRAGMA synchronous=NORMAL")
    elif url.startswith(("postgresql://", "postgres://", "postgresql+")):
        # psycopg 3, whose COPY the writer uses; the platform's PostgreSQL URLs name no driver.
        for plain in ("postgresql://", "postgres://"):
            if url.startswith(plain):
                url = "postgresql+psycopg://" + url.removeprefix(plain)
        engine = sa.create_engine(url, pool_size=1, max_overflow=0)
    else:
        raise ValueError(f"prediction log URL {masked(url)!r} is neither sqlite:///… nor postgresql://…")
    if create:
        ensure_table(engine)
    return engine


def ensure_table(engine: sa.Engine) -> None:
    """Make the table if missing. One of another layout is renamed, with its indexes and id sequence, and kept."""
    table = _table(engine)
    with engine.begin() as connection:
        found = sa.inspect(connection)
        if found.has_table(TABLE):
            have, want = [column["name"] for column in found.get_columns(TABLE)], list(table.columns.keys())
            if have == want:
                return
            if want[: len(have)] == have and set(want[len(have) :]) <= set(ADDED_COLUMNS):
                _add_columns(connection, table, want[len(have) :])
                return
            kept = f"{TABLE}_until_{datetime.now(UTC):%Y%m%d_%H%M%S}"
            renames = [f'ALTER TABLE {TABLE} RENAME TO "{kept}"']
            if engine.dialect.name == "postgresql":  # index and sequence names are the schema's, not the table's
                indexes = [index["name"] for index in found.get_indexes(TABLE)]
                indexes += [name] if (name := found.get_pk_constraint(TABLE).get("name")) else []
                renames += [f'ALTER INDEX "{n}" RENAME TO "{kept}{n.removeprefix(TABLE)}"' for n in indexes]
                sequence = connection.execute(sa.text(f"SELECT pg_get_serial_sequence('{TABLE}', 'id')")).scalar()
                renames += [f'ALTER SEQUENCE {sequence} RENAME TO "{kept}_id_seq"'] if sequence else []
            for statement in renames:
                connection.execute(sa.text(statement))
            log.warning("prediction log: the table %r had another layout; it is kept, with its rows, as %r", TABLE, kept)
        table.metadata.create_all(connection)


def _add_columns(connection: sa.Connection, table: sa.Table, names: list[str]) -> None:
    """Add the columns a log made before them lacks (`ADDED_COLUMNS`); its rows keep NULL there."""
    dialect = connection.dialect
    for name in names:
        column = table.c[name]
        kind = column.type.compile(dialect=dialect)
        # PostgreSQL: another worker may add it first. SQLite has no IF NOT EXISTS here; the writer retries a write
        # that failed, and the retry finds the column.
        exists = " IF NOT EXISTS" if dialect.name == "postgresql" else ""
        connection.execute(sa.text(f"ALTER TABLE {TABLE} ADD COLUMN{exists} {quote(name)} {kind}"))
    log.warning("prediction log: added the columns %s to the table %r; its earlier rows have them NULL", names, TABLE)


class PredictionLog:
    """A bounded queue of prediction rows and the thread that writes them to `url`.

    `capacity` bounds the rows waiting to be written, however they were recorded (one by one or as a frame).
    """

    def __init__(
        self,
        url: str,
        *,
        capacity: int = 100_000,
        batch_rows: int = 5_000,
        flush_seconds: float = 0.5,
        gather_seconds: float = 0.05,
        on_drop: Callable[[int], None] = lambda n: None,
        nice: int = 0,
    ) -> None:
        """`nice`: the writer thread's niceness on Linux (0: as the thread that made the log). Below 0 it gets more of
        the CPU than the threads that make predictions, so that under load it keeps up instead of dropping rows; that
        needs CAP_SYS_NICE (root has it), and without it the writer keeps the default and says so once.

        `gather_seconds`: after a write, the rows that come in are gathered this long before the next one (unless
        `batch_rows` of them wait). Under a load of single requests a write otherwise took one or two rows, and its
        fixed cost (a frame, its Arrow form, a transaction), paid per row, was most of the worker's CPU."""
        self.url = url
        self._nice = nice
        # The table is made by the writer on its first write: a log database that is down when the service starts
        # costs the rows it cannot take (counted), not the service.
        self.engine = engine_for(url, create=False)
        self._table_ready = False
        self._sqlite = self.engine.dialect.name == "sqlite"
        self._adbc: Any = None  # SQLite: the writer's own connection, opened on its first write
        self.capacity = capacity
        self._pending: deque[dict[str, Any] | pl.DataFrame] = deque()
        self._pending_rows = 0
        self._ready = threading.Condition()
        self._batch_rows = batch_rows
        self._flush_seconds = flush_seconds
        self._gather_seconds = gather_seconds
        self._written_at = float("-inf")  # when the last write ended (time.monotonic)
        self._on_drop = on_drop
        self.dropped = 0
        self.written = 0
        self.writes = 0  # transactions that wrote rows
        self.failed = 0
        self._closed = False
        self._writer = threading.Thread(target=self._run, name="prediction-log", daemon=True)
        self._writer.start()

    def _offer(self, item: dict[str, Any] | pl.DataFrame, rows: int) -> int:
        """Queue an item of `rows` rows unless that would pass the capacity; the number of rows dropped."""
        with self._ready:
            if self._closed or self._pending_rows + rows > self.capacity:
                dropped = rows
            else:
                self._pending.append(item)
                self._pending_rows += rows
                # The writer waits either for a first row or, gathering, for a batch's worth: woken for every row, it
                # would take the GIL from the event loop once per request only to wait again.
                if len(self._pending) == 1 or self._pending_rows >= self._batch_rows:
                    self._ready.notify()
                return 0
            self.dropped += dropped  # under the lock: the event loop, request threads and the writer all count
        self._on_drop(dropped)
        return dropped

    def record(self, rows: Iterable[Mapping[str, Any]]) -> int:
        """Queue rows (RESULT_COLUMNS but `predicted_at`, which is now, and `inputs`: the encounter's fields, None or
        absent where unknown); the number dropped."""
        now = datetime.now(UTC)
        return sum(self._offer({**row, "predicted_at": now}, 1) for row in rows)

    def record_frame(self, frame: pl.DataFrame) -> int:
        """Queue a frame of rows (COLUMNS but `predicted_at`, the fields typed as `encounter.decode_batch` gives them;
        an added column left out is NULL) at once; the number dropped."""
        if frame.is_empty():  # a batch of encounters none of which was scored: the writer takes a frame's time from its first row
            return 0
        return self._offer(frame.with_columns(pl.lit(datetime.now(UTC)).alias("predicted_at")), frame.height)

    def _take(self) -> tuple[list[dict[str, Any] | pl.DataFrame], bool]:
        """Items to write, waiting up to the flush interval for the first; and whether the log is closing."""
        with self._ready:
            if not self._pending and not self._closed:
                self._ready.wait(self._flush_seconds)
            gather = self._written_at + self._gather_seconds - time.monotonic()
            if gather > 0:
                self._ready.wait_for(lambda: self._closed or self._pending_rows >= self._batch_rows, gather)
            items, rows = [], 0
            while self._pending and rows < self._batch_rows:
                item = self._pending.popleft()
                size = item.height if isinstance(item, pl.DataFrame) else 1
                items.append(item)
                rows += size
                self._pending_rows -= size
            return items, self._closed and not self._pending

    @staticmethod
    def _frame(items: list[dict[str, Any] | pl.DataFrame], types: Mapping[str, pl.DataType], time_format: str) -> pl.DataFrame:
        """The items as one frame of COLUMNS, of `types`, in the order they were recorded; the time (UTC) as text."""
        parts: list[pl.DataFrame] = []
        singles: list[dict[str, Any]] = []

        def take_singles() -> None:
            # Column by column, straight from the recorded rows: the writer's time competes with the event loop's.
            if singles:
                inputs = [row["inputs"] for row in singles]
                columns = {c: [row.get(c) for row in singles] for c in RESULT_COLUMNS}
                parts.append(pl.DataFrame(columns | {name: [given.get(name) for given in inputs] for name in FIELDS}))
                singles.clear()

        for item in items:
            if isinstance(item, pl.DataFrame):
                take_singles()
                absent = {c: pl.lit(None, dtype=types[c]) for c in ADDED_COLUMNS if c not in item.columns}
                parts.append(item.with_columns(**absent))
            else:
                singles.append(item)
        take_singles()
        at = pl.col("predicted_at").dt.strftime(time_format)
        return pl.concat([part.select(COLUMNS).with_columns(at).cast(types) for part in parts])

    def _insert_sqlite(self, table: pa.Table) -> None:
        # ADBC binds the Arrow columns in C: the driver's executemany spent most of its time turning every value of
        # 10,000 rows into a Python object and back, and the log fell behind a loaded service. The rows are bound
        # into this connection's temporary table first, outside the write lock, then copied in (`sqlite_predictions`).
        if self._adbc is None:
            connection = adbc_driver_sqlite.dbapi.connect(self.url.removeprefix("sqlite:///"), autocommit=True)
            with connection.cursor() as cursor:
                for pragma in ("busy_timeout=30000", "synchronous=NORMAL"):  # the file is in WAL mode (`engine_for`)
                    cursor.execute(f"PRAGMA {pragma}")
                cursor.execute(_CREATE_STAGED)
            self._adbc = connection
        with self._adbc.cursor() as cursor:
            cursor.execute(f"DELETE FROM temp.{_STAGED}")  # what a failed write left
            cursor.adbc_ingest(_STAGED, table, mode="append", temporary=True)
            cursor.execute("BEGIN IMMEDIATE")
            try:
                cursor.execute(f"INSERT INTO main.{TABLE} SELECT * FROM temp.{_STAGED}")
            except BaseException:
                cursor.execute("ROLLBACK")
                raise
            cursor.execute("COMMIT")
            cursor.execute(f"DELETE FROM temp.{_STAGED}")

    def _insert_postgres(self, frame: pl.DataFrame) -> None:
        # CSV written by polars: handing COPY a Python value per field cost the worker many times more CPU.
        names = ", ".join(quote(name) for name in COLUMNS)
        with self.engine.begin() as connection:
            with connection.connection.driver_connection.cursor().copy(f"COPY {TABLE} ({names}) FROM STDIN (FORMAT csv)") as copy:
                copy.write(frame.write_csv(include_header=False))

    def _close_adbc(self) -> None:
        if self._adbc is not None:
            try:
                self._adbc.close()
            except Exception as error:  # closing a connection that failed: nothing left to lose
                log.debug("prediction log: closing the SQLite connection: %s", error)
            self._adbc = None

    def _write(self, items: list[dict[str, Any] | pl.DataFrame]) -> None:
        count = sum(item.height if isinstance(item, pl.DataFrame) else 1 for item in items)
        try:
            self._write_rows(items, count)
        except Exception as error:  # anything else: the rows are lost, counted, and the writer goes on
            self._lose(count, f"{type(error).__name__}: {_first_line(error)}")

    def _write_rows(self, items: list[dict[str, Any] | pl.DataFrame], count: int) -> None:
        if self._sqlite:
            rows: Any = self._frame(items, _SQLITE_TYPES, _SQLITE_TIME).to_arrow()
        else:
            rows = self._frame(items, _POSTGRES_TYPES, _POSTGRES_TIME)
        for attempt in range(3):
            try:
                if not self._table_ready:
                    ensure_table(self.engine)
                    self._table_ready = True
                    if self._sqlite:
                        # Python's sqlite3 made the table; the rows go through ADBC's own copy of SQLite. One process
                        # must not hold the file open through both: either copy's closing it releases every lock the
                        # other holds on it (sqlite.org/howtocorrupt.html, 2.2.1).
                        self.engine.dispose()
                if self._sqlite:
                    self._insert_sqlite(rows)
                else:
                    self._insert_postgres(rows)
                self.written += count
                self.writes += 1
                return
            # psycopg's own errors come from the COPY, which runs on the driver's cursor, not through SQLAlchemy.
            except (sa.exc.SQLAlchemyError, AdbcError, psycopg.Error) as error:
                log.warning("prediction log: writing %d rows failed (attempt %d): %s", count, attempt + 1, _first_line(error))
                self._close_adbc()  # a fresh connection for the next attempt
                time.sleep(0.2 * (attempt + 1))
        self._lose(count, f"3 failed writes to {masked(self.url)}")

    def _lose(self, count: int, why: str) -> None:
        with self._ready:
            self.failed += count
            self.dropped += count
        self._on_drop(count)
        log.error("prediction log: %d rows dropped after %s", count, why)

    def _run(self) -> None:
        if self._nice and sys.platform == "linux":
            try:  # on Linux a thread has a niceness of its own
                os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), self._nice)
            except OSError as error:
                log.info("prediction log: the writer keeps its priority (niceness %d not permitted: %s); under a CPU "
                         "overload it may drop rows, which are counted", self._nice, error)  # fmt: skip
        while True:
            items, finished = self._take()
            if items:
                self._write(items)
                self._written_at = time.monotonic()
            if finished:
                return

    def close(self, timeout: float = 30.0) -> None:
        """Write everything queued, then stop the writer. Rows recorded afterwards are dropped and counted; so are
        those still queued when the writer has not finished within `timeout` (its write under way may still land)."""
        with self._ready:
            if self._closed:
                return
            self._closed = True
            self._ready.notify()
        self._writer.join(timeout)
        if self._writer.is_alive():
            with self._ready:
                lost, self._pending_rows = self._pending_rows, 0
                self._pending.clear()
                self.dropped += lost
            self._on_drop(lost)
            log.error("prediction log: the writer did not finish within %.0f s; %d queued rows dropped", timeout, lost)
        else:
            self._close_adbc()
        self.engine.dispose()


def _first_line(error: BaseException) -> str:
    """An error's first line: what failed, without the rows' values a database's context lines may quote."""
    return next(iter(str(error).splitlines()), "")


def count_predictions(url: str) -> int:
    """How many rows the log holds."""
    engine = engine_for(url)
    try:
        with engine.connect() as connection:
            return int(connection.execute(sa.select(sa.func.count()).select_from(_table(engine))).scalar_one())
    finally:
        engine.dispose()
