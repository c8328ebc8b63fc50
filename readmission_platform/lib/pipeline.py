"""One batch through the warehouse: the work of raw_batches, clean_batches and features, outside Dagster.

The assets call these, and so does the benchmark, so what is measured is what runs.
"""

from __future__ import annotations

from datetime import datetime

import polars as pl

from readmission_platform.lib import schema
from readmission_platform.lib.cleaning import CleanResult, clean
from readmission_platform.lib.features import FEATURE_SCHEMA, build_features
from readmission_platform.lib.ingest import ParsedBatch, parse_batch
from readmission_platform.lib.warehouse import Warehouse

NOTHING_LOADED = pl.DataFrame(schema={"encounter_id": pl.Int64, schema.BATCH_ID: pl.String})


def loaded_elsewhere(store: Warehouse, batch_id: str) -> pl.DataFrame:
    """(encounter_id, batch_id) of every row other batches have stored."""
    found = store.query(
        "SELECT CAST(encounter_id AS BIGINT) AS encounter_id, batch_id FROM raw_batches WHERE batch_id <> $1",
        [batch_id],
    )
    return found if found.width else NOTHING_LOADED


def ingest_batch(store: Warehouse, content: bytes, *, batch_id: str, source_file: str, now: datetime) -> ParsedBatch:
    """Parse a batch file and replace the batch's rows in raw_batches and rejected_rows."""
    parsed = parse_batch(
        content, batch_id=batch_id, source_file=source_file, loaded_elsewhere=loaded_elsewhere(store, batch_id), now=now
    )
    store.replace_batch(
        {"raw_batches": (schema.RAW_SCHEMA, parsed.rows), "rejected_rows": (schema.REJECTED_SCHEMA, parsed.rejected)},
        batch_id,
    )
    return parsed


def clean_batch(store: Warehouse, batch_id: str) -> CleanResult:
    """Clean the batch's raw rows and replace its rows in clean_batches."""
    result = clean(store.read_table("raw_batches", batch_id))
    store.replace_batch({"clean_batches": (schema.CLEAN_SCHEMA, result.frame)}, batch_id)
    return result


def feature_batch(store: Warehouse, batch_id: str) -> pl.DataFrame:
    """Build the batch's features from its clean rows and replace its rows in features."""
    table = build_features(store.read_table("clean_batches", batch_id))
    store.replace_batch({"features": (FEATURE_SCHEMA, table)}, batch_id)
    return table
