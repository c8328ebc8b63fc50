"""One batch through raw_batches → clean_batches → features, outside Dagster.

The three stages run in memory, one after the other, and each stage's tables are handed to the warehouse as soon as
they are computed, so loading one overlaps computing the next; the batch's tables are then replaced together in one
transaction. The Dagster op of the three assets calls `process_batch`, and so does the benchmark, so what is measured
is what runs.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime

import polars as pl

from readmission_platform.lib import schema
from readmission_platform.lib.cleaning import CleanResult, clean
from readmission_platform.lib.features import FEATURE_SCHEMA, build_features
from readmission_platform.lib.ingest import ParsedBatch, judge_batch, read_batch
from readmission_platform.lib.warehouse import Warehouse, retried_on_conflict

RAW, CLEAN, FEATURES = "raw_batches", "clean_batches", "features"
REJECTED = "rejected_rows"
STAGES = (RAW, CLEAN, FEATURES)
TABLES = {RAW: (RAW, REJECTED), CLEAN: (CLEAN,), FEATURES: (FEATURES,)}  # what each stage writes
NOTHING_LOADED = pl.DataFrame(schema={"encounter_id": pl.Int64, schema.BATCH_ID: pl.String})


@dataclass
class BatchRun:
    """What one pass over a batch computed, stage by stage, and which stages' tables it wrote (`written`)."""

    batch_id: str
    loaded_elsewhere: pl.DataFrame = field(default_factory=lambda: NOTHING_LOADED)
    parsed: ParsedBatch | None = None
    cleaned: CleanResult | None = None
    features: pl.DataFrame | None = None
    written: list[str] = field(default_factory=list)


# Called for each computed stage, in order, with what the pass computed; False takes back the stages after it (a
# blocking check failed).
Gate = Callable[[str, BatchRun], bool]


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
    here reads that input from the warehouse. Once all are computed, `gate` is asked about each stage in turn, and a
    stage it stops keeps the stages after it from being written; the stages up to it are written either way. A
    `BatchFileError` or any other failure writes nothing.
    """
    unknown = set(stages) - set(STAGES)
    if unknown:
        raise ValueError(f"unknown stages {sorted(unknown)}; expected some of {STAGES}")
    if RAW in stages and (content is None or now is None):
        raise ValueError("raw_batches needs the batch file's content and the time of ingestion")
    # A batch that stored some of these encounters while this one was read: read again, rejecting them.
    return retried_on_conflict(lambda: _pass(store, batch_id, stages, content, source_file, now, gate))


def _pass(
    store: Warehouse,
    batch_id: str,
    stages: Collection[str],
    content: bytes | None,
    source_file: str,
    now: datetime | None,
    gate: Gate | None,
) -> BatchRun:
    run = BatchRun(batch_id)
    with store.batch_writer(batch_id) as writer:
        # Inputs come from the warehouse before anything is put: what was stored, not what is being staged.
        if RAW in stages:
            with ThreadPoolExecutor(1, thread_name_prefix="stored-ids") as lookup:
                stored = lookup.submit(writer.stored_elsewhere, RAW, "encounter_id")  # the server reads while the file is read
                read = read_batch(content, source_file)
                run.loaded_elsewhere = stored.result()
        elif CLEAN in stages:
            raw_rows = store.read_table(RAW, batch_id)
        if FEATURES in stages and CLEAN not in stages:
            clean_rows = store.read_table(CLEAN, batch_id)
        # Each stage's tables are put as soon as they are computed, so they load while the next stage computes.
        if RAW in stages:
            run.parsed = judge_batch(
                read, batch_id=batch_id, source_file=source_file, loaded_elsewhere=run.loaded_elsewhere, now=now
            )
            writer.put(RAW, schema.RAW_SCHEMA, run.parsed.rows)
            writer.put(REJECTED, schema.REJECTED_SCHEMA, run.parsed.rejected)
            raw_rows = run.parsed.rows
        if CLEAN in stages:
            run.cleaned = clean(raw_rows)
            writer.put(CLEAN, schema.CLEAN_SCHEMA, run.cleaned.frame)
            clean_rows = run.cleaned.frame
        if FEATURES in stages:
            run.features = build_features(clean_rows)
            writer.put(FEATURES, FEATURE_SCHEMA, run.features)
        # The gates run while the tables load; a stage that stops takes back the stages after it.
        computed = [stage for stage in STAGES if stage in stages]
        for i, stage in enumerate(computed):
            run.written.append(stage)
            if gate is not None and not gate(stage, run):
                for later in computed[i + 1 :]:
                    for table in TABLES[later]:
                        writer.discard(table)
                break
    return run
