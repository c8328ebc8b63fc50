"""The data tests of raw_batches: evaluated by `batch_tables` on the rows it is about to store, or alone (a check
selected without its asset) on the rows the warehouse holds."""

import dagster as dg

from readmission_platform.lib import schema
from readmission_platform.lib.ingest import ParsedBatch
from readmission_platform.lib.pipeline import RAW, REJECTED, BatchRun
from readmission_platform.lib.reporting import examples
from readmission_platform.lib.validation import duplicate_ids, shape_problems
from readmission_platform.lib.warehouse import Warehouse
from readmission_platform.lib.warehouse.base import stored_elsewhere

COLUMNS = dg.AssetCheckSpec(
    "check_raw_batches_columns",
    asset=RAW,
    blocking=True,
    description="raw_batches has exactly the schema's columns, and this batch has rows in it.",
)
UNIQUE_ENCOUNTER_ID = dg.AssetCheckSpec(
    "check_raw_batches_unique_encounter_id",
    asset=RAW,
    blocking=True,
    description="No encounter_id of this batch is stored twice, in this or any other batch.",
)
REJECTED_SHARE = dg.AssetCheckSpec(
    "check_raw_batches_rejected_share",
    asset=RAW,
    description="The share of this batch's rows set aside in rejected_rows stays under a threshold (warns).",
)


def check_raw_batches_columns(run: BatchRun, config) -> dg.AssetCheckResult:
    rows = run.parsed.rows
    problems = shape_problems(RAW, schema.RAW_SCHEMA, rows, run.batch_id)
    if not rows.height:
        problems[-1] += f": every one of its {run.parsed.rejected.height} rows was rejected"
    return dg.AssetCheckResult(
        asset_key=COLUMNS.asset_key,
        check_name=COLUMNS.name,
        passed=not problems,
        description="; ".join(problems) or f"{len(schema.RAW_SCHEMA)} columns as declared, {rows.height} rows",
        metadata={"rows": rows.height},
    )


def check_raw_batches_unique_encounter_id(run: BatchRun, config) -> dg.AssetCheckResult:
    found = duplicate_ids(run.parsed.rows, run.loaded_elsewhere)
    return dg.AssetCheckResult(
        asset_key=UNIQUE_ENCOUNTER_ID.asset_key,
        check_name=UNIQUE_ENCOUNTER_ID.name,
        passed=not found,
        description=f"{len(found)} encounter_id values are stored more than once: {examples(found)}"
        if found
        else "every encounter_id of this batch is stored once",
        metadata={"duplicated_ids": len(found)},
    )


def check_raw_batches_rejected_share(run: BatchRun, config) -> dg.AssetCheckResult:
    max_rejected_share = config.max_rejected_share
    n_loaded, rejected = run.parsed.rows.height, run.parsed.rejected
    n_rejected = rejected.height
    share = n_rejected / max(n_loaded + n_rejected, 1)
    passed = share <= max_rejected_share
    return dg.AssetCheckResult(
        asset_key=REJECTED_SHARE.asset_key,
        check_name=REJECTED_SHARE.name,
        passed=passed,
        severity=dg.AssetCheckSeverity.WARN,
        description=f"{n_rejected} of {n_loaded + n_rejected} rows rejected ({share:.2%}; limit {max_rejected_share:.2%})"
        + ("" if passed else f": {examples(rejected['reason'])}"),
        metadata={"rejected_rows": n_rejected, "rejected_share": share},
    )


CHECKS = (
    (COLUMNS, check_raw_batches_columns),
    (UNIQUE_ENCOUNTER_ID, check_raw_batches_unique_encounter_id),
    (REJECTED_SHARE, check_raw_batches_rejected_share),
)


def stored(store: Warehouse, batch_id: str) -> BatchRun:
    """The batch as the warehouse holds it: its raw and rejected rows, and the ids other batches store."""
    parsed = ParsedBatch(store.read_table(RAW, batch_id), store.read_table(REJECTED, batch_id))
    return BatchRun(batch_id, loaded_elsewhere=stored_elsewhere(store, RAW, "encounter_id", batch_id), parsed=parsed)
