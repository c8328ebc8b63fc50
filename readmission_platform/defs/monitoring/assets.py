from datetime import UTC, datetime

import dagster as dg
import polars as pl

from readmission_platform.defs.partitions import WAREHOUSE_POOL, batches, serving_days
from readmission_platform.defs.resources import MlflowResource, PredictionLogResource, WarehouseResource
from readmission_platform.lib import schema
from readmission_platform.lib.drift import PROBABILITY, PSI_SIGNIFICANT, VERSION, psi_report, serving_psi
from readmission_platform.lib.pipeline import FEATURES
from readmission_platform.lib.reporting import examples, markdown_table
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
    Newest: holding the latest encounters (`encounter_id` order is the data's time order, lib/history.py), whatever
    the batches are named.

    The bundled file runs through a decade in time order, and how payer, discharge and specialty were recorded changed
    in it: against all of a model's training rows every new batch drifted, against its newest batch only a change does.
    """
    placeholders = ", ".join(f"${i}" for i in range(1, len(trained) + 1))
    latest = store.query(
        f"SELECT batch_id, max(encounter_id) AS latest FROM features WHERE batch_id IN ({placeholders}) GROUP BY batch_id", list(trained)
    )
    newest = latest.sort("latest")["batch_id"][-1] if latest.height else max(trained)
    rows = store.read_table("features", newest)
    return (assign_split(rows).filter(pl.col(SPLIT) == "train") if rows.height else rows), newest


def with_history(warehouse, rows: pl.DataFrame) -> pl.DataFrame:
    """`rows` (a batch's features) with each encounter's point-in-time history as the training set holds it, so the
    production model scores them as it was trained; an encounter the training set lacks gets a first encounter's."""
    from readmission_platform.lib.history import HISTORY_FEATURES

    rows = rows.drop([name for name in HISTORY_FEATURES if name in rows.columns])
    with warehouse.open() as store:
        if "training_set" in store.tables():
            history = store.read_table("training_set").select("encounter_id", *HISTORY_FEATURES).unique("encounter_id")
            rows = rows.join(history, on="encounter_id", how="left")
    missing = [pl.lit(0.0).alias(name) for name in HISTORY_FEATURES if name not in rows.columns]
    return rows.with_columns(missing).with_columns(pl.col(HISTORY_FEATURES).cast(pl.Float64).fill_null(0.0))


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


class ServingDriftConfig(dg.Config):
    max_psi: float = PSI_SIGNIFICANT
    """A feature (or the probability) whose population stability index reaches this has drifted."""
    min_predictions: int = 1_000
    """A version with fewer predictions in the day is not judged: sampling alone moves PSI by about (bins − 1) / n."""


SERVING_DRIFT_CHECK = dg.AssetCheckSpec(
    "check_serving_drift_psi",
    asset="serving_drift",
    description="No input feature nor the probability of a version's served predictions drifted from the production "
    "model's newest training batch (warns).",
)


def _serving_drift_check(report: pl.DataFrame, config: ServingDriftConfig, reference: str) -> dg.AssetCheckResult:
    judged = report.filter(pl.col("rows") >= config.min_predictions)
    drifted = judged.filter(pl.col("psi") >= config.max_psi)
    movers = [f"v{v} {f} {p:.2f}" for v, f, p in drifted.select(VERSION, "feature", "psi").iter_rows()]
    if not judged.height:
        description = f"no version served {config.min_predictions} predictions in the day: drift not judged"
    elif drifted.height:
        description = f"{drifted.height} features drifted from {reference} (PSI ≥ {config.max_psi}): " + examples(movers)
    else:
        largest = judged.sort("psi", descending=True).row(0, named=True)
        description = f"largest PSI {largest['psi']:.3f} (v{largest[VERSION]} {largest['feature']}) against {reference}, under {config.max_psi}"
    return dg.AssetCheckResult(
        check_name=SERVING_DRIFT_CHECK.name,
        passed=not drifted.height,
        severity=dg.AssetCheckSeverity.WARN,
        description=description,
        metadata={"drifted_features": drifted.height, "versions_judged": judged[VERSION].n_unique()},
    )


@dg.asset(
    partitions_def=serving_days,
    group_name="monitoring",
    kinds={"polars", "sql"},
    pool=WAREHOUSE_POOL,
    check_specs=[SERVING_DRIFT_CHECK],
    description="PSI of every input feature and of the probability of a day's served predictions, per model version, "
    "against the newest training batch of the model in production.",
)
def serving_drift(
    context: dg.AssetExecutionContext,
    config: ServingDriftConfig,
    warehouse: WarehouseResource,
    mlflow: MlflowResource,
    prediction_log: PredictionLogResource,
) -> dg.MaterializeResult:
    from readmission_platform.lib.registry import trained_batches
    from readmission_platform.lib.training import predict_probability

    window = context.partition_time_window
    predictions = prediction_log.read(since=window.start, until=window.end)
    registry = mlflow.registry()
    production = registry.production()
    trained = trained_batches(production)
    reference = pl.DataFrame()
    if trained and predictions.height:
        with warehouse.open() as store:
            reference, reference_batch = training_reference(store, trained)
    if not reference.height:
        status = (
            "no predictions served in the day" if not predictions.height
            else "no model in production" if not trained
            else f"the newest training batch of v{production.version} is no longer in the warehouse"
        )
        return dg.MaterializeResult(
            metadata={"predictions": predictions.height, "status": status},
            check_results=[dg.AssetCheckResult(check_name=SERVING_DRIFT_CHECK.name, passed=True, description=f"{status}: drift not measured")],
        )
    reference = with_history(warehouse, reference)
    reference = reference.with_columns(
        pl.Series(PROBABILITY, predict_probability(registry.load_model(str(production.version)), reference))
    )
    report = serving_psi(predictions, reference)
    name = f"v{production.version}'s batch {reference_batch}"
    top = report.sort("psi", descending=True).group_by(VERSION, maintain_order=True).head(3)
    return dg.MaterializeResult(
        metadata={
            "predictions": predictions.height,
            "reference_version": str(production.version),
            "reference_batch": reference_batch,
            "max_psi": float(report["psi"].max()),
            "top_movers": ", ".join(f"v{v} {f} {p:.2f}" for v, f, p in top.select(VERSION, "feature", "psi").iter_rows()),
            "psi": dg.MetadataValue.md(markdown_table(report.with_columns(pl.col("psi").round(4)), limit=20)),
        },
        check_results=[_serving_drift_check(report, config, name)],
    )
