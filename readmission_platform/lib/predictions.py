"""The service's prediction log read into polars, for monitoring: SQLite (a file) or PostgreSQL, by URL.

The layout is declared here, and `serving/prediction_log.py` writes it: a row per prediction with its result columns
(with a rollout's: the stage that answered, the shadow's version and probability, why a candidate failed, its time)
and the encounter's fields. Both databases are read through ADBC, which hands the rows over as Arrow without a Python object
per value; SQLite's text times and 0/1 decisions come back as PostgreSQL's do (UTC times, booleans).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

import polars as pl

from readmission_platform.lib.encounter import REQUEST_DTYPES
from readmission_platform.lib.reporting import masked
from readmission_platform.lib.warehouse import quote

TABLE = "predictions"
TIME = pl.Datetime("us", "UTC")
RESULT_TYPES: dict[str, pl.DataType] = {
    "request_id": pl.String(), "predicted_at": TIME, "endpoint": pl.String(), "model_name": pl.String(),
    "model_version": pl.String(), "probability": pl.Float64(), "decision": pl.Boolean(), "risk_band": pl.String(),
    "stage": pl.String(), "shadow_version": pl.String(), "shadow_probability": pl.Float64(), "candidate_error": pl.String(), "candidate_ms": pl.Float64(),
}  # fmt: skip
TYPES: dict[str, pl.DataType] = RESULT_TYPES | dict(REQUEST_DTYPES)
# Added for rollouts (issue 15): a log written before has none of them until a worker writes to it again, and its rows
# read with them NULL; a NULL `stage` reads as production, which answered every request then.
ROLLOUT_COLUMNS = ("stage", "shadow_version", "shadow_probability", "candidate_error", "candidate_ms")
PRODUCTION_STAGE = "production"
# How the writer stores a time in SQLite (UTC, without the offset); as text, it orders as the time does.
_SQLITE_TIME = "%Y-%m-%d %H:%M:%S%.f"


class PredictionLogError(ValueError):
    """The prediction log's URL or the columns asked of it are not ones the log has."""


def _sqlite_path(url: str) -> Path | None:
    return Path(url.removeprefix("sqlite:///")) if url.startswith("sqlite:///") else None


def _postgres_uri(url: str) -> str | None:
    for prefix in ("postgresql+psycopg://", "postgresql+psycopg2://", "postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql://" + url.removeprefix(prefix)
    return None


def _connect(url: str):
    if (path := _sqlite_path(url)) is not None:
        import adbc_driver_sqlite.dbapi

        return adbc_driver_sqlite.dbapi.connect(str(path))
    if (uri := _postgres_uri(url)) is not None:
        import adbc_driver_postgresql.dbapi

        return adbc_driver_postgresql.dbapi.connect(uri)
    raise PredictionLogError(f"prediction log URL {masked(url)!r} is neither sqlite:///path nor postgresql://…")


def _has_table(cursor, sqlite: bool) -> bool:
    if sqlite:
        cursor.execute("SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = ?", [TABLE])
    else:
        cursor.execute("SELECT count(*) FROM information_schema.tables WHERE table_schema = current_schema() "
                       "AND table_name = $1", [TABLE])  # fmt: skip
    return bool(cursor.fetchone()[0])


def _table_columns(cursor, sqlite: bool) -> set[str]:
    if sqlite:
        cursor.execute(f"SELECT name FROM pragma_table_info('{TABLE}')")
    else:
        cursor.execute("SELECT column_name FROM information_schema.columns WHERE table_schema = current_schema() "
                       "AND table_name = $1", [TABLE])  # fmt: skip
    return {row[0] for row in cursor.fetchall()}


def read_predictions(
    url: str, columns: Sequence[str] | None = None, *, since: datetime | None = None, until: datetime | None = None
) -> pl.DataFrame:
    """The logged predictions made in [`since`, `until`) (either open), oldest first, as `columns` (default all) of
    `TYPES`; no rows when the log has none yet."""
    wanted = list(columns) if columns is not None else list(TYPES)
    if unknown := [name for name in wanted if name not in TYPES]:
        raise PredictionLogError(f"the prediction log has no column {unknown}; expected some of {list(TYPES)}")
    bounds = [(op, at) for op, at in ((">=", since), ("<", until)) if at is not None]
    for _, at in bounds:
        if at.tzinfo is None:
            raise PredictionLogError(f"time bound {at} has no time zone; give an aware datetime (UTC)")
    empty = pl.DataFrame(schema={name: TYPES[name] for name in wanted})
    if (path := _sqlite_path(url)) is not None and not path.exists():
        return empty
    sqlite = path is not None
    conditions = [f"predicted_at {op} {'?' if sqlite else f'${i}'}" for i, (op, _) in enumerate(bounds, start=1)]
    # SQLite compares the stored text, so a bound is written as the writer writes a time.
    params = [at.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S.%f") if sqlite else at for _, at in bounds]
    with _connect(url) as connection, connection.cursor() as cursor:
        if not _has_table(cursor, sqlite):
            return empty
        missing = set(ROLLOUT_COLUMNS) & set(wanted) - _table_columns(cursor, sqlite)
        selected = [f"NULL AS {quote(name)}" if name in missing else quote(name) for name in wanted]
        sql = f"SELECT {', '.join(selected)} FROM {TABLE}"
        sql += f" WHERE {' AND '.join(conditions)}" if conditions else ""
        # Rows are appended in time order, so the id (SQLite: the rowid) orders them by time.
        sql += " ORDER BY rowid" if sqlite else " ORDER BY id"
        if sqlite:
            # The SQLite driver infers a column's type from its first batch of rows and refuses a later batch that
            # differs: a column NULL in the first 1,024 rows (a rollout's, `weight`) read as integers, then text. One
            # batch of every row: the rows are all collected below anyway.
            cursor.adbc_statement.set_options(**{"adbc.sqlite.query.batch_rows": str(10**9)})
        cursor.execute(sql, params)
        frame = pl.from_arrow(cursor.fetch_arrow_table())
    if sqlite and "predicted_at" in wanted:
        frame = frame.with_columns(pl.col("predicted_at").str.to_datetime(_SQLITE_TIME, time_unit="us", time_zone="UTC"))
    frame = frame.cast({name: TYPES[name] for name in wanted})
    if "stage" in wanted:
        frame = frame.with_columns(pl.col("stage").fill_null(PRODUCTION_STAGE))
    return frame
