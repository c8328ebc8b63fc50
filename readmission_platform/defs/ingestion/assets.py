"""raw_batches, and the op that computes it with the preparation assets in one pass over a landed batch.

`batch_tables` computes raw_batches, clean_batches and features (`defs/preparation/assets.py`) in memory and writes
their tables of the batch together (`lib/pipeline.process_batch`), so no stage reads back what the one before it just
wrote. Each asset's checks are evaluated on its rows before the next stage is written: a blocking check that fails
keeps the assets after it unmaterialized, as a blocking check between separate steps would. Any one of the three can
be materialized alone (it then reads its input from the warehouse), and a check selected without its asset is
evaluated on the rows the warehouse holds.
"""

from datetime import UTC, datetime

import dagster as dg
import polars as pl

from readmission_platform.defs.ingestion import checks as raw_checks
from readmission_platform.defs.partitions import WAREHOUSE_POOL, batches
from readmission_platform.defs.preparation import assets as prepared
from readmission_platform.defs.preparation import checks as prepared_checks
from readmission_platform.defs.resources import LandingResource, WarehouseResource
from readmission_platform.lib.ingest import BatchFileError
from readmission_platform.lib.landing import AmbiguousBatchFile, content_hash, find_batch_file
from readmission_platform.lib.pipeline import CLEAN, FEATURES, RAW, STAGES, BatchRun, process_batch
from readmission_platform.lib.reporting import markdown_table

# Each stage's checks, each with the function that evaluates it on a BatchRun, and how to read that stage back.
CHECKS = {RAW: raw_checks.CHECKS, CLEAN: prepared_checks.CLEAN_CHECKS, FEATURES: prepared_checks.FEATURE_CHECKS}
STORED = {RAW: raw_checks.stored, CLEAN: prepared_checks.stored_clean, FEATURES: prepared_checks.stored_features}


class BatchTablesConfig(dg.Config):
    max_rejected_share: float = 0.01
    """Largest share of a batch's rows that may be rejected before check_raw_batches_rejected_share warns."""
    min_label_rate: float = 0.05
    """check_clean_batches_label warns below this <30 rate (the data set's is 11.2 %; far off points at a broken export)."""
    max_label_rate: float = 0.20
    """check_clean_batches_label warns above this <30 rate."""


@dg.multi_asset(
    name="batch_tables",
    specs=[
        dg.AssetSpec(
            RAW,
            group_name="ingestion",
            kinds=prepared.KINDS,
            skippable=True,
            description="Each landed batch file as delivered (text columns), with rows that cannot be accepted set aside in rejected_rows.",
        ),
        *prepared.SPECS,
    ],
    check_specs=[spec for stage in STAGES for spec, _ in CHECKS[stage]],
    partitions_def=batches,
    can_subset=True,
    pool=WAREHOUSE_POOL,
)
def batch_tables(
    context: dg.AssetExecutionContext, config: BatchTablesConfig, landing: LandingResource, warehouse: WarehouseResource
):
    batch_id = context.partition_key
    selected = {key.path[-1] for key in context.selected_asset_keys}
    stages = [stage for stage in STAGES if stage in selected]
    selected_checks = {key.name for key in context.selected_asset_check_keys}
    # A check selected without its asset: what it tests is what the warehouse holds.
    on_stored = [s for s in STAGES if s not in stages and any(spec.name in selected_checks for spec, _ in CHECKS[s])]
    content, source_file = None, ""
    if RAW in stages:
        try:
            path = find_batch_file(landing.path, batch_id)
        except AmbiguousBatchFile as error:
            raise dg.Failure(description=f"batch {batch_id} was not loaded, nothing was written: {error}") from None
        if path is None:
            raise dg.Failure(f"no file for batch {batch_id!r} in {landing.path}; it was removed after it landed")
        content, source_file = path.read_bytes(), path.name
    results: list[dg.AssetCheckResult] = []

    def gate(stage: str, run: BatchRun) -> bool:
        evaluated = evaluate(stage, run, config, selected_checks)
        results.extend(evaluated)
        return passes(evaluated)

    run = None
    try:
        with warehouse.open() as store:
            if stages:
                run = process_batch(
                    store, batch_id, stages=stages, content=content, source_file=source_file, now=datetime.now(UTC), gate=gate
                )
            for stage in on_stored:
                results += evaluate(stage, STORED[stage](store, batch_id), config, selected_checks)
    except BatchFileError as error:
        raise dg.Failure(description=f"batch {batch_id} was not loaded, nothing was written: {error}") from None
    materialized = {RAW: _raw_metadata, CLEAN: prepared.clean_metadata, FEATURES: prepared.features_metadata}
    for stage in run.written if run else []:
        metadata = materialized[stage](run) | {"warehouse": store.describe()}
        if stage == RAW:
            metadata |= {"source_file": source_file, "sha256": content_hash(content)}
        yield dg.MaterializeResult(asset_key=stage, metadata=metadata)
    yield from results
    if run and len(run.written) < len(stages):
        stopped = [stage for stage in stages if stage not in run.written]
        context.log.warning(f"{batch_id}: {', '.join(stopped)} not materialized: a blocking check of {run.written[-1]} failed")
    if content is not None:
        context.log.info(f"{batch_id}: {run.parsed.rows.height} rows loaded, {run.parsed.rejected.height} rejected")


def evaluate(stage: str, run: BatchRun, config: BatchTablesConfig, names: set[str] | None = None) -> list[dg.AssetCheckResult]:
    """The checks of one stage named in `names` (every one without it), on the rows `run` holds."""
    return [check(run, config) for spec, check in CHECKS[stage] if names is None or spec.name in names]


def passes(results: list[dg.AssetCheckResult]) -> bool:
    """No blocking check failed: the stages after these checks' asset may run."""
    return all(r.passed or r.severity == dg.AssetCheckSeverity.WARN for r in results)


def _raw_metadata(run: BatchRun) -> dict:
    parsed = run.parsed
    reasons = (
        parsed.rejected.select(pl.col("reason").str.replace_all(r"\d+", "N").alias("reason"))
        .group_by("reason")
        .len("rows")
        .sort("rows", descending=True)
    )
    return {
        "dagster/row_count": parsed.rows.height,
        "rejected_rows": parsed.rejected.height,
        "rejection_reasons": dg.MetadataValue.md(markdown_table(reasons) if reasons.height else "none"),
    }
