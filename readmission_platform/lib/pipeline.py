"""One batch through raw_batches → clean_batches → features, outside Dagster.

The three stages run in memory, one after the other, and each stage's tables are handed to the warehouse as soon as
they are computed, so loading one overlaps computing the next; the batch's tables are then replaced together in one
transaction. The Dagster op of the three assets calls `process_batch`, and so does the benchmark, so what is measured
is what runs.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass, field
from datetime import datetime

import polars as pl

from readmission_platform.lib import schema
from readmission_platform.lib.cleaning import CleanResult, clean
from readmission_platform.lib.features import FEATURE_SCHEMA, build_features
from readmission_platform.lib.ingest import ParsedBatch, judge_batch, read_batch
from readmission_platform.lib.warehouse import Warehouse

RAW, CLEAN, FEATURES = "raw_batches", "clean_batches", "features"
STAGES = (RAW, CLEAN, FEATURES)
INGESTING = "raw_batches"  # the warehouse lock held while a batch's raw rows are judged and stored
NOTHING_LOADED = pl.DataFrame(schema={"encounter_id": pl.Int64, schema.BATCH_ID: pl.String})


@dataclass
class BatchRun:
    """What one pass over a batch computed, stage by stage, and which stages' tables it wrote."""

    batch_id: str
    loaded_elsewhere: pl.DataFrame = field(default_factory=lambda: NOTHING_LOADED)
    parsed: ParsedBatch | None = None
    cleaned: CleanResult | None = None
    features: pl.DataFrame | None = None
    written: list[str] = field(default_factory=list)


# Called after each stage with what it computed; False stops the stages after it (a blocking check failed).
Gate = Callable[[str, BatchRun], bool]


def loaded_elsewhere(store: Warehouse, batch_id: str) -> pl.DataFrame:
    """(encounter_id, batch_id) of every row other batches have stored."""
    found = store.query(
        "SELECT CAST(encounter_id AS BIGINT) AS encounter_id, batch_id FROM raw_batches WHERE batch_id <> $1",
        [batch_id],
    )
    return found if found.width else NOTHING_LOADED


def process_batch(
    store: Warehouse,
    batch_id: str,
    *,
    stages: Collection[str] = STAGES,
    content: bytes | None = None,
    source_file: str = "",
    now: datetime | None = None,
    gate: Gate | None = None,
) -> BatchRun:
    """Compute the given stages of one batch and replace their tables' rows of the batch in one transaction.

    raw_batches parses `content` (the landed file, named `source_file`); a stage whose input stage is not computed
    here reads that input from the warehouse. After each computed stage `gate` may stop the ones after it; the
    tables of the stages computed so far are written either way. A `BatchFileError` or any other failure writes
    nothing.
    """
    unknown = set(stages) - set(STAGES)
    if unknown:
        raise ValueError(f"unknown stages {sorted(unknown)}; expected some of {STAGES}")
    if RAW in stages and (content is None or now is None):
        raise ValueError("raw_batches needs the batch file's content and the time of ingestion")
    run = BatchRun(batch_id)

    def done(stage: str) -> bool:
        run.written.append(stage)
        return gate is not None and not gate(stage, run)

    # From reading the ids other batches stored to storing this batch's, no other batch is ingested, so an id can
    # never slip into two batches however many runs write at once.
    with store.exclusive(INGESTING) if RAW in stages else nullcontext():
        # Inputs come from the warehouse before anything is written: what was stored, not what is being staged.
        if RAW in stages:
            with ThreadPoolExecutor(1, thread_name_prefix="stored-ids") as lookup:
                stored = lookup.submit(loaded_elsewhere, store, batch_id)  # the server scans while the file is read
                read = read_batch(content, source_file)
                run.loaded_elsewhere = stored.result()
        elif CLEAN in stages:
            raw_rows = store.read_table(RAW, batch_id)
        if FEATURES in stages and CLEAN not in stages:
            clean_rows = store.read_table(CLEAN, batch_id)
        with store.batch_writer(batch_id) as writer:
            if RAW in stages:
                run.parsed = judge_batch(
                    read, batch_id=batch_id, source_file=source_file, loaded_elsewhere=run.loaded_elsewhere, now=now
                )
                writer.put(RAW, schema.RAW_SCHEMA, run.parsed.rows)
                writer.put("rejected_rows", schema.REJECTED_SCHEMA, run.parsed.rejected)
                if done(RAW):
                    return run
                raw_rows = run.parsed.rows
            if CLEAN in stages:
                run.cleaned = clean(raw_rows)
                writer.put(CLEAN, schema.CLEAN_SCHEMA, run.cleaned.frame)
                if done(CLEAN):
                    return run
                clean_rows = run.cleaned.frame
            if FEATURES in stages:
                run.features = build_features(clean_rows)
                writer.put(FEATURES, FEATURE_SCHEMA, run.features)
                done(FEATURES)
    return run
