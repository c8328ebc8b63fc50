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
from readmission_platform.lib.warehouse import Warehouse

DRIFT_SCHEMA = {
    schema.BATCH_ID: pl.String(),
    "feature": pl.String(),
    "kind": pl.String(),
    "psi": pl.Float64(),
    "reference_version": pl.String(),
    "computed_at": pl.Datetime("us", "UTC"),
}


def training_reference(store: Warehouse, trained: list[str]) -> tuple[pl.DataFrame, str]:
    """The training rows (train side of the patient split) of the newest batch a model was trained on, and its id.

    The bundled file runs through a decade in time order, and how payer, discharge and specialty were recorded changed
    in it: against all of a model's training rows every new batch drifted, against its newest batch only a change does.
    """
    newest = max(trained)
    rows = store.read_table("features", newest)
    return (assign_split(rows).filter(pl.col(SPLIT) == "train") if rows.height else rows), newest


@dg.asset(
    deps=[FEATURES],
    partitions_def=batches,
    group_name="monitoring",
    kinds={"polars", "sql"},
    pool=WAREHOUSE_POOL,
    description="Population stability index of each feature of the batch against the newest training batch of the model in production.",
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
        reference, reference_batch = training_reference(store, trained)
        if not reference.height:
            return dg.MaterializeResult(
                metadata={"reference_version": str(production.version), "max_psi": None, "status": f"{reference_batch}, v{production.version}'s newest training batch, is no longer in the warehouse"}
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
            "reference_batch": reference_batch,
            "max_psi": float(report["psi"].max()),
            "drifted_features": ", ".join(drifted["feature"]) or "none",
            "psi": dg.MetadataValue.md(markdown_table(report.with_columns(pl.col("psi").round(4)), limit=12)),
        }
    )
