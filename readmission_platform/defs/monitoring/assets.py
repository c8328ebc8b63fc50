from datetime import UTC, datetime

import dagster as dg
import polars as pl

from readmission_platform.defs.partitions import WAREHOUSE_POOL, batches
from readmission_platform.defs.resources import MlflowResource, WarehouseResource
from readmission_platform.lib import schema
from readmission_platform.lib.drift import PSI_SIGNIFICANT, psi_report
from readmission_platform.lib.pipeline import FEATURES
from readmission_platform.lib.reporting import markdown_table
from readmission_platform.lib.splitting import SPLIT, assign_split

DRIFT_SCHEMA = {
    schema.BATCH_ID: pl.String(),
    "feature": pl.String(),
    "kind": pl.String(),
    "psi": pl.Float64(),
    "reference_version": pl.String(),
    "computed_at": pl.Datetime("us", "UTC"),
}


@dg.asset(
    deps=[FEATURES],
    partitions_def=batches,
    group_name="monitoring",
    kinds={"polars", "sql"},
    pool=WAREHOUSE_POOL,
    description="Population stability index of each feature of the batch against the training rows of the model in production.",
)
def batch_drift(
    context: dg.AssetExecutionContext, warehouse: WarehouseResource, mlflow: MlflowResource
) -> dg.MaterializeResult:
    batch_id = context.partition_key
    from readmission_platform.lib.registry import trained_batches

    production = mlflow.registry().production()
    trained = trained_batches(production)
    if not trained:
        with warehouse.open() as store:
            store.replace_batch({"batch_drift": (DRIFT_SCHEMA, pl.DataFrame(schema=DRIFT_SCHEMA))}, batch_id)
        return dg.MaterializeResult(
            metadata={"reference_version": None, "max_psi": None, "status": "no model in production yet: nothing to compare with"}
        )
    with warehouse.open() as store:
        current = store.read_table("features", batch_id)
        placeholders = ", ".join(f"${i}" for i in range(1, len(trained) + 1))
        reference = store.query(f"SELECT * FROM features WHERE batch_id IN ({placeholders})", trained)
        # The production model's own training rows: its batches, train side of the patient split.
        reference = assign_split(reference).filter(pl.col(SPLIT) == "train") if reference.height else reference
        if not reference.height:
            return dg.MaterializeResult(
                metadata={"reference_version": str(production.version), "max_psi": None, "status": f"the training batches of v{production.version} are no longer in the warehouse"}
            )
        report = psi_report(reference, current)
        rows = report.with_columns(
            pl.lit(batch_id).alias(schema.BATCH_ID),
            pl.lit(str(production.version)).alias("reference_version"),
            pl.lit(datetime.now(UTC)).alias("computed_at"),
        ).select(list(DRIFT_SCHEMA))
        store.replace_batch({"batch_drift": (DRIFT_SCHEMA, rows)}, batch_id)
    drifted = report.filter(pl.col("psi") >= PSI_SIGNIFICANT)
    return dg.MaterializeResult(
        metadata={
            "reference_version": str(production.version),
            "max_psi": float(report["psi"].max()),
            "drifted_features": ", ".join(drifted["feature"]) or "none",
            "psi": dg.MetadataValue.md(markdown_table(report.with_columns(pl.col("psi").round(4)), limit=12)),
        }
    )
