"""Every prediction, written in the background to SQLite (default) or PostgreSQL, without making inference wait.

`PredictionLog.record` (or `record_frame`, for a batch) puts rows on a bounded queue and returns at once; a thread
takes them off in batches and hands each, through a pipe, to a writer process of the log's own, which inserts it in
one transaction: into SQLite through ADBC, bound outside the write lock and copied in under it
(`sqlite_predictions`), into PostgreSQL by COPY. In a process of its own the writing does not hold the worker's
interpreter lock, which the event loop answering requests waits for. When the queue is full the rows are dropped and
counted (`dropped`), so overload slows nothing down and loses nothing silently; so are rows the writer reports it
could not write. `close` drains the queue and waits for the writer, so a clean stop loses nothing; a worker that dies
closes the pipe, and the writer still writes what it was handed.

A row holds the prediction and the encounter's fields as sent, one typed column each, named as the data set names
them (`A1Cresult`, `glyburide-metformin`): the request model refuses the data set's identifiers, and of a request's
`patient_id` only its keyed hash is stored (`patient_key`), so no patient identifier is.
A table made before the rollout columns (stage, shadow_version, shadow_probability, candidate_error, candidate_ms) or
`patient_key` gets them added (ALTER TABLE … ADD COLUMN), its rows NULL there. A table of another layout (an earlier version's kept the
fields as one JSON text) is renamed, with its rows, to `predictions_until_<UTC time>`, and a new one is made. The log is
read back by `lib/predictions.read_predictions`.
"""

from __future__ import annotations

import io
import json
import logging
import os
import signal
import struct
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import adbc_driver_sqlite.dbapi
import msgspec
import numpy as np
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
RESTART_SECONDS = 1.0  # a writer process that ended is replaced at most this often
_PACKAGE_ROOT = str(Path(__file__).resolve().parents[2])  # the folder `readmission_platform` was imported from


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


def _rows(item: dict[str, Any] | pl.DataFrame) -> int:
    """How many rows a queued item is: a frame's height, or one."""
    return item.height if isinstance(item, pl.DataFrame) else 1


class _Store:
    """The writing side, in the writer process: rows (dicts and frames, in the order recorded) into the table, one
    transaction a batch, with up to three attempts; what cannot be written is reported lost."""

    def __init__(self, url: str, report: Callable[..., None]) -> None:
        self.url = url
        self.engine = engine_for(url, create=False)
        self._report = report  # report(written=n) | report(lost=n, why=…)
        self._table_ready = False
        self._sqlite = self.engine.dialect.name == "sqlite"
        self._adbc: Any = None  # SQLite: the writer's own connection, opened on its first write

    @staticmethod
    def _frame(items: list[dict[str, Any] | pl.DataFrame], types: Mapping[str, pl.DataType], time_format: str) -> pl.DataFrame:
        """The items as one frame of COLUMNS, of `types`, in the order they were recorded; the time (UTC) as text."""
        parts: list[pl.DataFrame] = []
        singles: list[dict[str, Any]] = []

        def take_singles() -> None:
            if singles:  # column by column, straight from the recorded rows
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
        # CSV written by polars: handing COPY a Python value per field cost many times more CPU.
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

    def close(self) -> None:
        self._close_adbc()
        self.engine.dispose()

    def write(self, items: list[dict[str, Any] | pl.DataFrame]) -> None:
        count = sum(map(_rows, items))
        try:
            self._write_rows(items, count)
        except Exception as error:  # anything else: the rows are lost, reported, and the writer goes on
            self._report(lost=count, why=f"{type(error).__name__}: {_first_line(error)}")

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
                self._report(written=count)
                return
            # psycopg's own errors come from the COPY, which runs on the driver's cursor, not through SQLAlchemy.
            except (sa.exc.SQLAlchemyError, AdbcError, psycopg.Error) as error:
                log.warning("prediction log: writing %d rows failed (attempt %d): %s", count, attempt + 1, _first_line(error))
                self._close_adbc()  # a fresh connection for the next attempt
                time.sleep(0.2 * (attempt + 1))
        self._report(lost=count, why=f"3 failed writes to {masked(self.url)}")


# The pipe between a worker and its writer process carries messages of a length (4 bytes, little-endian) and a
# MessagePack body: first the writer's settings, then each batch as a list whose items are single rows (maps) or frames
# (Arrow IPC streams, as bytes), in the order recorded. The writer answers on its standard output, one JSON object a
# line: {"written": n}, {"lost": n, "why": …} or {"level": …, "message": …}, a line for the worker's log.
_LENGTH = struct.Struct("<I")


def _plain(value: Any) -> Any:
    """A numpy scalar (a probability, a flag) as the Python number it holds, for MessagePack."""
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"a prediction log row holds a {type(value).__name__}")


_ENCODER = msgspec.msgpack.Encoder(enc_hook=_plain)


def _message(body: Any) -> bytes:
    encoded = _ENCODER.encode(body)
    return _LENGTH.pack(len(encoded)) + encoded


def _batch_message(items: list[dict[str, Any] | pl.DataFrame]) -> bytes:
    return _message([item if isinstance(item, dict) else _ipc(item) for item in items])


def _ipc(frame: pl.DataFrame) -> bytes:
    # Compressed: a batch's 10,000 rows are megabytes uncompressed (each short text a 16-byte view), and each fresh
    # buffer of that size cost more in page faults than zstd costs both ends (benchmarks/README.md).
    buffer = io.BytesIO()
    frame.write_ipc_stream(buffer, compression="zstd")
    return buffer.getvalue()


class _Child:
    """One writer process, and the rows handed to it (`sent`) and accounted for by it (`settled`: written or lost)."""

    def __init__(self, process: subprocess.Popen) -> None:
        self.process = process
        self.sent = 0
        self.settled = 0
        self.ended = False  # its reports have ended: it has exited or is about to


class PredictionLog:
    """A bounded queue of prediction rows, handed in batches to a writer process that writes them to `url`.

    `capacity` bounds the rows waiting in this process, however they were recorded (one by one or as a frame); a
    batch handed to the writer is in its pipe or its hands. The writing (a frame built of the rows, bound, inserted)
    takes CPU the worker's event loop would otherwise wait for, as a thread holds the interpreter's lock; in a process
    of its own it runs beside it, on another core when there is one. The writer process ends when its pipe closes:
    after `close`, or when the worker dies, even by SIGKILL, in which case it still writes what it was handed.
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
        """`nice`: the writer process's niceness on Linux (0: as this process). Below 0 it gets more of the CPU than
        the processes that make predictions, so that under load it keeps up instead of dropping rows; that needs
        CAP_SYS_NICE (root has it), and without it the writer keeps the default and says so once.

        `gather_seconds`: after a batch is handed over, the rows that come in are gathered this long before the next
        (unless `batch_rows` of them wait). Under a load of single requests a write otherwise took one or two rows,
        and its fixed cost (a frame, its Arrow form, a transaction), paid per row, was most of a worker's CPU."""
        self.url = url
        self._nice = nice
        engine_for(url, create=False).dispose()  # a URL of no supported database is named here, to the caller
        self.capacity = capacity
        self._pending: deque[dict[str, Any] | pl.DataFrame] = deque()
        self._pending_rows = 0
        self._ready = threading.Condition()
        self._batch_rows = batch_rows
        self._flush_seconds = flush_seconds
        self._gather_seconds = gather_seconds
        self._written_at = float("-inf")  # when the last batch was handed over (time.monotonic)
        self._on_drop = on_drop
        self.dropped = 0
        self.written = 0
        self.writes = 0  # transactions that wrote rows
        self.failed = 0
        self._closed = False
        self._child: _Child | None = None
        self._started_at = float("-inf")  # when the last writer process was started (time.monotonic)
        self._readers: list[threading.Thread] = []
        self._sender = threading.Thread(target=self._run, name="prediction-log", daemon=True)
        self._sender.start()

    def _offer(self, item: dict[str, Any] | pl.DataFrame, rows: int) -> int:
        """Queue an item of `rows` rows unless that would pass the capacity; the number of rows dropped."""
        with self._ready:
            if self._closed or self._pending_rows + rows > self.capacity:
                dropped = rows
            else:
                self._pending.append(item)
                self._pending_rows += rows
                # The sender waits either for a first row or, gathering, for a batch's worth: woken for every row, it
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
        """Items to hand over, waiting up to the flush interval for the first; and whether the log is closing."""
        with self._ready:
            if not self._pending and not self._closed:
                self._ready.wait(self._flush_seconds)
            gather = self._written_at + self._gather_seconds - time.monotonic()
            if gather > 0:
                self._ready.wait_for(lambda: self._closed or self._pending_rows >= self._batch_rows, gather)
            items, rows = [], 0
            while self._pending and rows < self._batch_rows:
                item = self._pending.popleft()
                size = _rows(item)
                items.append(item)
                rows += size
                self._pending_rows -= size
            return items, self._closed and not self._pending

    def _start(self) -> _Child:
        """A writer process, and the thread that reads its reports. One that ended is replaced at most once a
        `RESTART_SECONDS`, so a writer that cannot start costs rows (counted), not a process a batch."""
        wait = self._started_at + RESTART_SECONDS - time.monotonic()
        if wait > 0:
            time.sleep(wait)
        self._started_at = time.monotonic()
        # The same code as this process runs, wherever it was imported from (a Bento's folder, a checkout).
        path = os.pathsep.join(filter(None, [_PACKAGE_ROOT, os.environ.get("PYTHONPATH")]))
        process = subprocess.Popen(
            [sys.executable, "-m", __name__], stdin=subprocess.PIPE, stdout=subprocess.PIPE, close_fds=True,
            env={**os.environ, "PYTHONPATH": path},
        )  # fmt: skip
        child = _Child(process)
        reader = threading.Thread(target=self._read, args=(child,), name="prediction-log-reports", daemon=True)
        reader.start()
        self._readers = [thread for thread in self._readers if thread.is_alive()] + [reader]
        assert process.stdin is not None
        process.stdin.write(_message({"url": self.url, "nice": self._nice}))  # not on its command line, seen by all
        return child

    def _hand_over(self, items: list[dict[str, Any] | pl.DataFrame]) -> None:
        """Hand a batch to the writer process, starting one if there is none; rows it cannot take are lost, counted."""
        count = sum(map(_rows, items))
        try:
            message = _batch_message(items)
        except Exception as error:  # a value MessagePack or Arrow cannot carry: a defect, named, the rows counted
            self._lose(count, f"{type(error).__name__}: {_first_line(error)}")
            return
        try:
            if self._child is None or self._child.ended:
                self._child = self._start()
            child = self._child
            assert child.process.stdin is not None
            child.process.stdin.write(message)
            child.process.stdin.flush()
        except OSError as error:  # the process could not start, or ended (a broken pipe)
            self._lose(count, f"the writer process is not there ({type(error).__name__}: {_first_line(error)})")
            return
        with self._ready:
            lost = child.ended  # it ended after taking the message into its pipe: its reader has settled up already
            if not lost:
                child.sent += count
        if lost:
            self._lose(count, f"the writer process ended (exit code {child.process.poll()})")

    def _read(self, child: _Child) -> None:
        """The writer process's reports, until it ends; then the rows it was handed and did not account for are lost."""
        assert child.process.stdout is not None
        try:
            for line in child.process.stdout:
                try:
                    report = json.loads(line)
                except ValueError:  # a line cut short by the process's end
                    log.error("prediction log: the writer process said %r", line[:200])
                    continue
                if "written" in report:
                    with self._ready:
                        self.written += report["written"]
                        self.writes += 1
                        child.settled += report["written"]
                elif "lost" in report:
                    with self._ready:
                        child.settled += report["lost"]
                    self._lose(report["lost"], report["why"])
                else:
                    log.log(report["level"], "%s", report["message"])
        finally:
            code = child.process.wait()
        with self._ready:
            child.ended = True
            unsettled = child.sent - child.settled
        if unsettled:
            self._lose(unsettled, f"the writer process ended (exit code {code}) before writing them")

    def _lose(self, count: int, why: str) -> None:
        with self._ready:
            self.failed += count
            self.dropped += count
        self._on_drop(count)
        log.error("prediction log: %d rows dropped after %s", count, why)

    def _run(self) -> None:
        try:  # at once, so that the first rows do not wait for it to start
            self._child = self._start()
        except OSError as error:  # tried again with the first batch
            log.error("prediction log: the writer process did not start: %s", error)
        while True:
            items, finished = self._take()
            if items:
                self._hand_over(items)
                self._written_at = time.monotonic()
            if finished:
                break
        if self._child is not None and self._child.process.stdin is not None:
            try:
                self._child.process.stdin.close()  # the writer writes what it holds, and ends
            except OSError:  # it has ended already: its reader counts what it did not write
                pass

    def close(self, timeout: float = 30.0) -> None:
        """Write everything queued, then stop the writer. Rows recorded afterwards are dropped and counted; so are
        those still queued here when the writer has not taken them within `timeout`. What it was handed by then is
        written even after this returns (its reports still count it)."""
        with self._ready:
            if self._closed:
                return
            self._closed = True
            self._ready.notify()
        deadline = time.monotonic() + timeout
        self._sender.join(timeout)
        for reader in self._readers:
            reader.join(max(0.0, deadline - time.monotonic()))
        if (child := self._child) is not None and not child.ended:
            log.warning("prediction log: the writer process is still writing %d rows after %.0f s; they land once it "
                        "is done, after this process has ended", child.sent - child.settled, timeout)  # fmt: skip
        if self._sender.is_alive():
            with self._ready:
                lost, self._pending_rows = self._pending_rows, 0
                self._pending.clear()
                self.dropped += lost
            self._on_drop(lost)
            log.error("prediction log: the writer did not take the queued rows within %.0f s; %d dropped", timeout, lost)


def write_predictions(url: str, rows: Iterable[Mapping[str, Any]] = (), frame: pl.DataFrame | None = None) -> int:
    """Write rows as `PredictionLog.record` takes them, then a frame as `record_frame` takes it, to the log at `url`
    now, in this process, in one transaction, as the writer process writes them; the number written. For what has no
    requests to keep answering (a backfill, a test's log). Raises what kept them out after the writer's attempts."""
    now = datetime.now(UTC)
    items: list[dict[str, Any] | pl.DataFrame] = [{**row, "predicted_at": now} for row in rows]
    if frame is not None and not frame.is_empty():
        items.append(frame.with_columns(pl.lit(now).alias("predicted_at")))
    outcome: dict[str, Any] = {}
    store = _Store(url, lambda **report: outcome.update(report))
    try:
        if items:
            store.write(items)
    finally:
        store.close()
    if "lost" in outcome:
        raise RuntimeError(f"prediction log: {outcome['lost']} rows not written: {outcome['why']}")
    return outcome.get("written", 0)


def _writer_main() -> None:
    """The writer process (`python -m readmission_platform.serving.prediction_log`): its settings, then batches, from
    its standard input until it closes; each batch written in one transaction; reports on its standard output."""
    # It ends when its pipe closes, after writing what it holds: a Ctrl-C at the terminal or a SIGTERM to the whole
    # group (systemd's way) reaches it too, and must not cost the rows its worker has handed it.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    reports: Any = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # whatever else prints goes where errors go, not into the reports
    source = sys.stdin.buffer

    def report(**fields: Any) -> None:
        nonlocal reports
        if reports is not None:
            try:
                reports.write(json.dumps(fields) + "\n")
            except OSError:  # the worker has ended (a broken pipe): what it handed over is still written
                reports = None

    class Forward(logging.Handler):  # the writer's log lines, to the worker's log
        def emit(self, record: logging.LogRecord) -> None:
            report(level=record.levelno, message=record.getMessage())

    logging.basicConfig(level=logging.WARNING, handlers=[Forward()])
    log.setLevel(logging.INFO)

    def message() -> Any:
        head = source.read(_LENGTH.size)
        if len(head) < _LENGTH.size:
            return None  # the pipe closed: the worker closed the log, or ended
        return msgspec.msgpack.decode(source.read(_LENGTH.unpack(head)[0]))

    settings = message()
    if settings is None:
        return
    if settings["nice"] and sys.platform == "linux":
        try:
            os.setpriority(os.PRIO_PROCESS, 0, settings["nice"])
        except OSError as error:
            log.info("prediction log: the writer keeps its priority (niceness %d not permitted: %s); under a CPU "
                     "overload it may drop rows, which are counted", settings["nice"], error)  # fmt: skip
    store = _Store(settings["url"], report)
    while (batch := message()) is not None:
        store.write([pl.read_ipc_stream(item) if isinstance(item, bytes) else item for item in batch])
    store.close()


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


if __name__ == "__main__":
    _writer_main()
