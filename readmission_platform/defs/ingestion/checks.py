import dagster as dg

from readmission_platform.defs.ingestion.assets import raw_batches
from readmission_platform.defs.partitions import WAREHOUSE_POOL, batches
from readmission_platform.defs.resources import WarehouseResource
from readmission_platform.lib import schema
from readmission_platform.lib.reporting import examples


class RejectedShareConfig(dg.Config):
    max_rejected_share: float = 0.01
    """Largest share of a batch's rows that may be rejected before the check warns."""


@dg.asset_check(
    asset=raw_batches,
    partitions_def=batches,
    blocking=True,
    pool=WAREHOUSE_POOL,
    description="raw_batches has exactly the schema's columns, and this batch has rows in it.",
)
def check_raw_batches_columns(context: dg.AssetCheckExecutionContext, warehouse: WarehouseResource) -> dg.AssetCheckResult:
    with warehouse.open() as store:
        problems, count = store.shape_problems("raw_batches", schema.RAW_SCHEMA, context.partition_key)
    return dg.AssetCheckResult(
        passed=not problems,
        description="; ".join(problems) or f"{len(schema.RAW_SCHEMA)} columns as declared, {count} rows",
        metadata={"rows": count},
    )


@dg.asset_check(
    asset=raw_batches,
    partitions_def=batches,
    blocking=True,
    pool=WAREHOUSE_POOL,
    description="No encounter_id of this batch is stored twice, in this or any other batch.",
)
def check_raw_batches_unique_encounter_id(
    context: dg.AssetCheckExecutionContext, warehouse: WarehouseResource
) -> dg.AssetCheckResult:
    duplicates = warehouse.open().query(
        """
        SELECT encounter_id, count(*) AS copies, string_agg(batch_id, ', ' ORDER BY batch_id) AS batches
        FROM raw_batches
        WHERE encounter_id IN (SELECT encounter_id FROM raw_batches WHERE batch_id = $1)
        GROUP BY encounter_id HAVING count(*) > 1 ORDER BY encounter_id
        """,
        [context.partition_key],
    )
    found = [f"{row['encounter_id']} (in {row['batches']})" for row in duplicates.iter_rows(named=True)]
    return dg.AssetCheckResult(
        passed=not found,
        description=f"{len(found)} encounter_id values are stored more than once: {examples(found)}"
        if found
        else "every encounter_id of this batch is stored once",
        metadata={"duplicated_ids": len(found)},
    )


@dg.asset_check(
    asset=raw_batches,
    partitions_def=batches,
    pool=WAREHOUSE_POOL,
    description="The share of this batch's rows set aside in rejected_rows stays under a threshold (warns).",
)
def check_raw_batches_rejected_share(
    context: dg.AssetCheckExecutionContext, config: RejectedShareConfig, warehouse: WarehouseResource
) -> dg.AssetCheckResult:
    batch_id = context.partition_key
    with warehouse.open() as store:
        loaded = store.query("SELECT count(*) AS n FROM raw_batches WHERE batch_id = $1", [batch_id])
        rejected = store.query("SELECT reason FROM rejected_rows WHERE batch_id = $1 ORDER BY line_number", [batch_id])
    n_loaded = int(loaded["n"][0]) if loaded.height else 0
    n_rejected = rejected.height
    share = n_rejected / max(n_loaded + n_rejected, 1)
    passed = share <= config.max_rejected_share
    return dg.AssetCheckResult(
        passed=passed,
        severity=dg.AssetCheckSeverity.WARN,
        description=f"{n_rejected} of {n_loaded + n_rejected} rows rejected ({share:.2%}; limit {config.max_rejected_share:.2%})"
        + ("" if passed else f": {examples(rejected['reason'])}"),
        metadata={"rejected_rows": n_rejected, "rejected_share": share},
    )
