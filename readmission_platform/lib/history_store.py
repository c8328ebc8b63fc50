"""Each patient's history state where the service can read it: a table in the prediction log's database.

The service never opens the DuckDB warehouse (one writing process at a time); the pipeline's `patient_history` asset
writes every patient's `history.STATE` here, keyed by `history.patient_key` (a keyed hash: no hospital identifier is
stored), and the service reads it back whole when its version changes. A write replaces the table and bumps the
version in one transaction, so a reader sees the old states or the new ones, never a mix.
"""

from __future__ import annotations

import polars as pl
import sqlalchemy as sa

from readmission_platform.lib.history import KEY, STATE, STATE_SCHEMA
from readmission_platform.lib.predictions import connect, sqlite_path

TABLE = "patient_history"
VERSION_TABLE = "patient_history_version"
STORED_SCHEMA: dict[str, pl.DataType] = {KEY: pl.String()} | STATE_SCHEMA

_metadata = sa.MetaData()
states_table = sa.Table(
    TABLE, _metadata, sa.Column(KEY, sa.String(64), primary_key=True), *(sa.Column(n, sa.BigInteger(), nullable=False) for n in STATE)
)
version_table = sa.Table(
    VERSION_TABLE, _metadata, sa.Column("version", sa.BigInteger(), nullable=False), sa.Column("patients", sa.BigInteger(), nullable=False)
)


def write_states(engine: sa.Engine, states: pl.DataFrame) -> int:
    """Replace every stored state with `states` (`STORED_SCHEMA`) in one transaction; the new version number."""
    missing = [name for name in STORED_SCHEMA if name not in states.columns]
    if missing:
        raise ValueError(f"patient states lack the columns {missing}; expected {list(STORED_SCHEMA)}")
    if states[KEY].null_count() or states[KEY].n_unique() != states.height:
        raise ValueError("patient states need one row per patient_key, none null")
    _metadata.create_all(engine)
    rows = states.select(list(STORED_SCHEMA)).to_dicts()
    with engine.begin() as connection:
        version = connection.execute(sa.select(sa.func.max(version_table.c.version))).scalar() or 0
        connection.execute(states_table.delete())
        if rows:
            connection.execute(states_table.insert(), rows)
        connection.execute(version_table.delete())
        connection.execute(version_table.insert(), {"version": version + 1, "patients": len(rows)})
    return version + 1


def read_newer(url: str, held: int | None) -> tuple[int | None, pl.DataFrame | None]:
    """The stored version and, unless it is `held`, every patient's state (`STORED_SCHEMA`; None when it is), from the
    prediction log's database at `url`; (None, None) before the first write.

    Read through ADBC (`predictions.connect`), as a process that writes the log must. The version is read first: a
    write between the two reads gives newer states under the older version, which the next read replaces."""
    path = sqlite_path(url)
    if path is not None and not path.exists():
        return None, None
    catalog = (
        "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = ?"
        if path is not None
        else "SELECT count(*) FROM information_schema.tables WHERE table_schema = current_schema() AND table_name = $1"
    )
    with connect(url) as connection, connection.cursor() as cursor:
        cursor.execute(catalog, [VERSION_TABLE])
        if not cursor.fetchone()[0]:
            return None, None
        cursor.execute(f"SELECT max(version) FROM {VERSION_TABLE}")
        (version,) = cursor.fetchone()
        if version == held:
            return version, None
        cursor.execute(f"SELECT {', '.join(STORED_SCHEMA)} FROM {TABLE}")
        states = pl.DataFrame(pl.from_arrow(cursor.fetch_arrow_table())).cast(STORED_SCHEMA)
    return version, states
