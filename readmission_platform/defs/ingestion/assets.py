"""raw_batches → clean_batches → features: three assets of one landed batch, computed in one pass.

One op computes the three in memory and writes their tables of the batch together (`lib/pipeline.process_batch`),
so no stage reads back what the one before it just wrote. Each asset's checks are evaluated on its rows before the
next stage runs: a blocking check that fails keeps the assets after it unmaterialized, as a blocking check between
separate steps would. Any one of the three can still be materialized alone; it then reads its input from the
warehouse.
"""

from datetime import UTC, datetime

import dagster as dg
import polars as pl

from readmission_platform.defs.ingestion import checks as raw_checks
from readmission_platform.defs.partitions import WAREHOUSE_POOL, batches
from readmission_platform.defs.preparation import checks as prepared_checks
from readmission_platform.defs.resources import LandingResource, WarehouseResource
from readmission_platform.lib import schema
from readmission_platform.lib.features import FEATURE_COLUMNS
from readmission_platform.lib.ingest import BatchFileError
from readmission_platform.lib.landing import content_hash, find_batch_file
from readmission_platform.lib.pipeline import CLEAN, FEATURES, RAW, STAGES, BatchRun, process_batch
from readmission_platform.lib.reporting import markdown_table

KINDS = {"polars", "sql"}


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
            kinds=KINDS,
            skippable=True,
            description="Each landed batch file as delivered (text columns), with rows that cannot be accepted set aside in rejected_rows.",
        ),
        dg.AssetSpec(
            CLEAN,
            deps=[RAW],
            group_name="preparation",
            kinds=KINDS,
            skippable=True,
            description="Typed encounters with ICD-9 groups and the 30-day label; deaths, hospice and invalid gender dropped.",
        ),
        dg.AssetSpec(
            FEATURES,
            deps=[CLEAN],
            group_name="preparation",
            kinds=KINDS,
            skippable=True,
            description="Model-ready feature columns of lib/features.py, with identifiers and labels kept for lineage and splitting.",
        ),
    ],
    check_specs=[*raw_checks.RAW_CHECKS, *prepared_checks.CLEAN_CHECKS, *prepared_checks.FEATURE_CHECKS],
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
    content, source_file = None, ""
    if RAW in stages:
        path = find_batch_file(landing.path, batch_id)
        if path is None:
            raise dg.Failure(f"no file for batch {batch_id!r} in {landing.path}; it was removed after it landed")
        content, source_file = path.read_bytes(), path.name
    results: list[dg.AssetCheckResult] = []

    def gate(stage: str, run: BatchRun) -> bool:
        evaluated = [r for r in stage_checks(stage, run, config) if r.check_name in selected_checks]
        results.extend(evaluated)
        return passes(evaluated)

    try:
        with warehouse.open() as store:
            run = process_batch(
                store, batch_id, stages=stages, content=content, source_file=source_file, now=datetime.now(UTC), gate=gate
            )
    except BatchFileError as error:
        raise dg.Failure(description=f"batch {batch_id} was not loaded, nothing was written: {error}") from None
    materialized = {RAW: _raw_metadata, CLEAN: _clean_metadata, FEATURES: _features_metadata}
    for stage in run.written:
        metadata = materialized[stage](run) | {"warehouse": store.describe()}
        if stage == RAW:
            metadata |= {"source_file": source_file, "sha256": content_hash(content)}
        yield dg.MaterializeResult(asset_key=stage, metadata=metadata)
    for result in results:
        yield result
    if len(run.written) < len(stages):
        stopped = [stage for stage in stages if stage not in run.written]
        context.log.warning(f"{batch_id}: {', '.join(stopped)} not materialized: a blocking check of {run.written[-1]} failed")
    if content is not None:
        context.log.info(f"{batch_id}: {run.parsed.rows.height} rows loaded, {run.parsed.rejected.height} rejected")


def stage_checks(stage: str, run: BatchRun, config: BatchTablesConfig) -> list[dg.AssetCheckResult]:
    """Every check of one stage, on what the pass computed for it."""
    if stage == RAW:
        return [
            raw_checks.check_raw_batches_columns(run),
            raw_checks.check_raw_batches_unique_encounter_id(run),
            raw_checks.check_raw_batches_rejected_share(run, config.max_rejected_share),
        ]
    if stage == CLEAN:
        return [
            prepared_checks.check_clean_batches_values(run.cleaned.frame),
            prepared_checks.check_clean_batches_label(run.cleaned.frame, config.min_label_rate, config.max_label_rate),
        ]
    return [prepared_checks.check_features_spec(run.features, run.batch_id)]


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


def _clean_metadata(run: BatchRun) -> dict:
    frame = run.cleaned.frame
    rate = frame[schema.LABEL_30D].mean() if frame.height else None
    return {
        "dagster/row_count": frame.height,
        **{f"dropped_{reason}": count for reason, count in run.cleaned.dropped.items()},
        "readmitted_30d_rate": float(rate) if rate is not None else None,
        "preview": dg.MetadataValue.md(markdown_table(frame.head(5))),
    }


def _features_metadata(run: BatchRun) -> dict:
    return {
        "dagster/row_count": run.features.height,
        "feature_columns": len(FEATURE_COLUMNS),
        "preview": dg.MetadataValue.md(markdown_table(run.features.select(FEATURE_COLUMNS[:12]).head(5))),
    }
