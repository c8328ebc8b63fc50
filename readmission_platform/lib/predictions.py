"""The service's prediction log read into polars, for monitoring: SQLite (a file) or PostgreSQL, by URL.

The layout is declared here, and `serving/prediction_log.py` writes it: a row per prediction with its result columns
(with a rollout's: the stage that answered, the shadow's version and probability, why a candidate failed, its time;
and the keyed hash of the patient the request named) and the encounter's fields. Both databases are read through ADBC, which hands the rows over as Arrow without a Python object
per value; SQLite's text times and 0/1 decisions come back as PostgreSQL's do (UTC times, booleans).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

import polars as pl
import pyarrow as pa
from adbc_driver_manager import Error as AdbcError

from readmission_platform.lib.encounter import REQUEST_DTYPES
from readmission_platform.lib.history import KEY as PATIENT_KEY
from readmission_platform.lib.reporting import masked
from readmission_platform.lib.warehouse import quote

TABLE = "predictions"
TIME = pl.Datetime("us", "UTC")
RESULT_TYPES: dict[str, pl.DataType] = {
    "request_id": pl.String(), "predicted_at": TIME, "endpoint": pl.String(), "model_name": pl.String(),
    "model_version": pl.String(), "probability": pl.Float64(), "decision": pl.Boolean(), "risk_band": pl.String(),
    "stage": pl.String(), "shadow_version": pl.String(), "shadow_probability": pl.Float64(), "candidate_error": pl.String(), "candidate_ms": pl.Float64(),
    # Added for history as outcomes arrive (issue 17): the keyed hash of the request's patient_id
    # (`history.patient_key`), null without one; a log written before reads it as null.
    PATIENT_KEY: pl.String(),
}  # fmt: skip
TYPES: dict[str, pl.DataType] = RESULT_TYPES | dict(REQUEST_DTYPES)
# Added for rollouts (issue 15): a log written before has none of them until a worker writes to it again, and its rows
# read with them NULL; a NULL `stage` reads as production, which answered every request then.
ROLLOUT_COLUMNS = ("stage", "shadow_version", "shadow_probability", "candidate_error", "candidate_ms")
PRODUCTION_STAGE = "production"
# How the writer stores a time in SQLite (UTC, without the offset); as text, it orders as the time does.
_SQLITE_TIME = "%Y-%m-%d %H:%M:%S%.f"
# A SQLite log of fewer rows than this a thread is read on one.
_ROWS_PER_THREAD = 100_000
# The temporary table of the request ids a read picks out, in the database when they are fewer than a
# quarter of a SQLite log's rows (benchmarks/README.md).
_WANTED = "wanted_requests"
_SHARE_PICKED_OUT = 4


class PredictionLogError(ValueError):
    """The prediction log's URL or the columns asked of it are not ones the log has, or its database cannot be read."""


def sqlite_path(url: str) -> Path | None:
    """The file of a sqlite:/// URL; None for any other."""
    return Path(url.removeprefix("sqlite:///")) if url.startswith("sqlite:///") else None


def _postgres_uri(url: str) -> str | None:
    for prefix in ("postgresql+psycopg://", "postgresql+psycopg2://", "postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql://" + url.removeprefix(prefix)
    return None


def connect(url: str):
    """An ADBC connection to the prediction log's database. A process that writes the log (the service's workers)
    reads its SQLite file through this too: one process holding a file through two copies of SQLite (ADBC's and
    Python's sqlite3) loses its locks whenever either closes it."""
    if (path := sqlite_path(url)) is not None:
        import adbc_driver_sqlite.dbapi

        return adbc_driver_sqlite.dbapi.connect(str(path))
    if (uri := _postgres_uri(url)) is not None:
        import adbc_driver_postgresql.dbapi

        return adbc_driver_postgresql.dbapi.connect(uri)
    raise PredictionLogError(f"prediction log URL {masked(url)!r} is neither sqlite:///path nor postgresql://…")


@contextmanager
def _cursor(url: str) -> Iterator:
    """A cursor on the log's database; a database that does not answer or is not one is named as a PredictionLogError."""
    try:
        with connect(url) as connection, connection.cursor() as cursor:
            yield cursor
    except AdbcError as error:
        reason = next(iter(str(error).splitlines()), type(error).__name__)
        raise PredictionLogError(f"the prediction log at {masked(url)} cannot be read: {reason}") from error


def _stored_columns(cursor, sqlite: bool) -> set[str]:
    """The columns the log's table has; none when there is no table yet."""
    if sqlite:
        cursor.execute(f"SELECT name FROM pragma_table_info('{TABLE}')")
    else:
        cursor.execute("SELECT column_name FROM information_schema.columns WHERE table_schema = current_schema() "
                       "AND table_name = $1", [TABLE])  # fmt: skip
    return {name for (name,) in cursor.fetchall()}


def read_predictions(
    url: str,
    columns: Sequence[str] | None = None,
    *,
    since: datetime | None = None,
    until: datetime | None = None,
    request_ids: Sequence[str] | None = None,
) -> pl.DataFrame:
    """The logged predictions made in [`since`, `until`) (either open), of `request_ids` if given, oldest first, as
    `columns` (default all) of `TYPES`; no rows when the log has none yet. A column the stored table does not have
    yet (a log written before the column was added) reads as nulls."""
    wanted = list(columns) if columns is not None else list(TYPES)
    if unknown := [name for name in wanted if name not in TYPES]:
        raise PredictionLogError(f"the prediction log has no column {unknown}; expected some of {list(TYPES)}")
    bounds = [(op, at) for op, at in ((">=", since), ("<", until)) if at is not None]
    for _, at in bounds:
        if at.tzinfo is None:
            raise PredictionLogError(f"time bound {at} has no time zone; give an aware datetime (UTC)")
    empty = pl.DataFrame(schema={name: TYPES[name] for name in wanted})
    if (path := sqlite_path(url)) is not None and not path.exists():
        return empty
    sqlite = path is not None
    conditions = [f"predicted_at {op} {'?' if sqlite else f'${i}'}" for i, (op, _) in enumerate(bounds, start=1)]
    # SQLite compares the stored text, so a bound is written as the writer writes a time.
    params = [at.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S.%f") if sqlite else at for _, at in bounds]
    with _cursor(url) as cursor:
        stored = _stored_columns(cursor, sqlite)
        if not stored:
            return empty
        if sqlite:
            # Each bound a query of its own: SQLite looks up a lone min() or max() of the rowid, and scans the whole
            # table for the two together.
            cursor.execute(f"SELECT (SELECT min(rowid) FROM {TABLE}), (SELECT max(rowid) FROM {TABLE})")
            first, last = cursor.fetchone()
    selected = [quote(name) if name in stored else f"NULL AS {quote(name)}" for name in wanted]
    sql = f"SELECT {', '.join(selected)} FROM {TABLE}"
    if request_ids is not None:
        ids = list(dict.fromkeys(request_ids))
        if sqlite and first is not None and len(ids) * _SHARE_PICKED_OUT > last - first + 1:
            # Many ids: their temporary table and its index cost more than handing every row over (on threads).
            read = read_predictions(url, list(dict.fromkeys([*wanted, "request_id"])), since=since, until=until)
            return read.filter(pl.col("request_id").is_in(pl.Series(ids, dtype=pl.String).implode())).select(wanted)
        # Handing the rows over costs far more than the database's scan, so a few requests are picked out in the
        # database: the ids go into a temporary table of the reading connection, on one thread.
        wanted_ids = pa.table({"request_id": pa.array(ids, pa.string())})
        conditions = [*conditions, f"request_id IN (SELECT request_id FROM {_WANTED})"]
        return _fetch(url, sql, conditions, params, wanted, " ORDER BY rowid" if sqlite else " ORDER BY id", wanted_ids)
    if not sqlite:
        return _fetch(url, sql, conditions, params, wanted, " ORDER BY id")
    if first is None:
        return empty
    # SQLite reads a table on one thread; a large log is read in ranges of the rowid (which orders the rows by time,
    # as they were appended), each on a connection and thread of its own, and the parts put back in order.
    parts = max(1, min(os.cpu_count() or 1, 4, (last - first + 1) // _ROWS_PER_THREAD))
    edges = [first + (last - first + 1) * i // parts for i in range(parts)] + [last + 1]
    ranges = [(conditions + ["rowid >= ?", "rowid < ?"], params + [low, high]) for low, high in zip(edges, edges[1:])]
    if parts == 1:
        return _fetch(url, sql, *ranges[0], wanted, " ORDER BY rowid")
    with ThreadPoolExecutor(max_workers=parts) as pool:
        return pl.concat(pool.map(lambda part: _fetch(url, sql, *part, wanted, " ORDER BY rowid"), ranges))


def newest_predictions(url: str, columns: Sequence[str], count: int = 1) -> pl.DataFrame:
    """The `count` newest logged predictions, newest first (none when the log has none yet), as `columns` of `TYPES`:
    the database picks them out by the order they were appended in, however long the log."""
    if unknown := [name for name in columns if name not in TYPES]:
        raise PredictionLogError(f"the prediction log has no column {unknown}; expected some of {list(TYPES)}")
    empty = pl.DataFrame(schema={name: TYPES[name] for name in columns})
    if (path := sqlite_path(url)) is not None and not path.exists():
        return empty
    with _cursor(url) as cursor:
        stored = _stored_columns(cursor, path is not None)
    if not stored:
        return empty
    selected = [quote(name) if name in stored else f"NULL AS {quote(name)}" for name in columns]
    order = f" ORDER BY {'rowid' if path is not None else 'id'} DESC LIMIT {int(count)}"
    return _fetch(url, f"SELECT {', '.join(selected)} FROM {TABLE}", [], [], list(columns), order)


def _fetch(
    url: str, sql: str, conditions: list[str], params: list, wanted: list[str], order: str, wanted_ids: pa.Table | None = None
) -> pl.DataFrame:
    """The rows of `sql` that meet every condition, in `order`, typed as TYPES; `wanted_ids` (request_id) are put in
    a temporary table `_WANTED` first."""
    sql += f" WHERE {' AND '.join(conditions)}" if conditions else ""
    with _cursor(url) as cursor:
        if wanted_ids is not None:
            cursor.adbc_ingest(_WANTED, wanted_ids, mode="create", temporary=True)
            # Without an index SQLite probes a temporary B-tree it builds anyway; PostgreSQL hashes the ids either way.
            cursor.execute(f"CREATE UNIQUE INDEX {_WANTED}_request_id ON {_WANTED} (request_id)")
        if sqlite_path(url) is not None:
            # The SQLite driver infers a column's type from its first batch of rows and refuses a later batch that
            # disagrees (a rollout column NULL in the first rows, text later): one batch of every row, as the rows are
            # all collected here anyway.
            cursor.adbc_statement.set_options(**{"adbc.sqlite.query.batch_rows": str(10**9)})
        cursor.execute(sql + order, params)
        frame = pl.from_arrow(cursor.fetch_arrow_table())
    if frame.is_empty():  # SQLite types the columns of no rows by no value: as integers
        return pl.DataFrame(schema={name: TYPES[name] for name in wanted})
    if sqlite_path(url) is not None and "predicted_at" in wanted:
        frame = frame.with_columns(pl.col("predicted_at").str.to_datetime(_SQLITE_TIME, time_unit="us", time_zone="UTC"))
    frame = frame.cast({name: TYPES[name] for name in wanted})
    if "stage" in wanted:
        frame = frame.with_columns(pl.col("stage").fill_null(PRODUCTION_STAGE))
    return frame
