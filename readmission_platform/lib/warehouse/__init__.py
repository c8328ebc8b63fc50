"""The warehouse: one DuckDB file by default, PostgreSQL for a team; the same calls for both.

Tables are created from the polars schemas of `lib/schema.py`. A batch's rows of several tables are replaced together
in one transaction (`Warehouse.batch_writer`): `base` holds what both dialects share, `duckdb` and `postgres` how each
stores a batch.
"""

from pathlib import Path

from readmission_platform.lib.warehouse.base import (
    BatchWriter,
    Columns,
    ConflictingWrite,
    Warehouse,
    WarehouseError,
    Writes,
    literal,
    quote,
    retried_on_conflict,
    table_ddl,
)
from readmission_platform.lib.warehouse.duckdb import DuckDBWarehouse
from readmission_platform.lib.warehouse.postgres import PostgresWarehouse, partition_prefix

__all__ = [
    "BatchWriter",
    "Columns",
    "ConflictingWrite",
    "DuckDBWarehouse",
    "PostgresWarehouse",
    "Warehouse",
    "WarehouseError",
    "Writes",
    "literal",
    "open_warehouse",
    "partition_prefix",
    "quote",
    "retried_on_conflict",
    "table_ddl",
]


def open_warehouse(url: str) -> Warehouse:
    """`postgresql://…` → PostgreSQL; `duckdb:///path`, or a plain path → that DuckDB file."""
    if url.startswith(("postgresql://", "postgres://")):
        return PostgresWarehouse(url)
    path = url.removeprefix("duckdb:///") if url.startswith("duckdb:///") else url.removeprefix("duckdb://")
    if "://" in path:
        raise WarehouseError(f"warehouse URL {url!r} is neither postgresql://… nor duckdb:///path")
    return DuckDBWarehouse(Path(path))
