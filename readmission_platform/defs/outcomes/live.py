"""live_performance: each model version measured on the predictions it made, once their outcomes came back, with
the checks that say whether the serving version still keeps what its promotion promised."""

import base64
import tempfile
from datetime import UTC, datetime
from pathlib import Path

import dagster as dg
import polars as pl

from readmission_platform.defs.partitions import WAREHOUSE_POOL
from readmission_platform.defs.resources import MlflowResource, PredictionLogResource, WarehouseResource
from readmission_platform.lib import live
from readmission_platform.lib.outcomes import OUTCOMES
from readmission_platform.lib.reporting import markdown_table

LIVE, BY_DAY = live.LIVE_TABLE, live.PERIOD_TABLE
DISCRIMINATION, CALIBRATION = "check_live_performance_discrimination", "check_live_performance_calibration"
SEVERITY = {"warn": dg.AssetCheckSeverity.WARN, "error": dg.AssetCheckSeverity.ERROR}


class LivePerformanceConfig(dg.Config):
    min_outcomes: int = 200
    """A version is judged once it has this many outcomes of both kinds; fewer give intervals too wide to say anything."""
    roc_auc_error_margin: float = 0.05
    """Live ROC-AUC whose interval stays this far below the test ROC-AUC fails with severity error, not warn."""
    resamples: int = 200
    """Bootstrap resamples behind each interval."""
    period: str = "1d"
    """The period of the plot over time (a polars duration: 1d, 1w)."""

    def limits(self) -> live.Limits:
        return live.Limits(min_outcomes=self.min_outcomes, roc_auc_error_margin=self.roc_auc_error_margin)


def _log_to_mlflow(mlflow: MlflowResource, figures: pl.DataFrame, context: dg.AssetExecutionContext) -> dict[str, str]:
    """Each version's live figures as metrics `live_<metric>` (and `_lower`, `_upper`) on the run that made it, beside
    its validation and test metrics; version → that run's page."""
    from readmission_platform.lib.registry import RegistryError

    registry = mlflow.registry()
    links = {}
    at = int(datetime.now(UTC).timestamp() * 1000)
    for (version,), rows in figures.group_by("model_version", maintain_order=True):
        try:
            run_id = registry.version(version).run_id
        except RegistryError as error:
            context.log.warning(f"live figures of v{version} not logged to MLflow: {error}")
            continue
        for row in rows.iter_rows(named=True):
            for suffix, value in (("", row["estimate"]), ("_lower", row["lower"]), ("_upper", row["upper"])):
                registry.client.log_metric(run_id, f"live_{row['metric']}{suffix}", value, timestamp=at)
        registry.client.log_metric(run_id, "live_outcomes", rows["outcomes"][0], timestamp=at)
        links[version] = registry.run_url(run_id)
    return links


def _replaced(mlflow: MlflowResource, version: str | None) -> str | None:
    """The version that `version` replaced in production, as the registry recorded it."""
    from readmission_platform.lib.registry import PREVIOUS_PRODUCTION, RegistryError

    if version is None:
        return None
    try:
        return mlflow.registry().version(version).tags.get(PREVIOUS_PRODUCTION) or None
    except RegistryError:
        return None


@dg.asset(
    deps=[OUTCOMES],
    group_name="monitoring",
    kinds={"polars", "sql", "mlflow"},
    pool=WAREHOUSE_POOL,
    check_specs=[
        dg.AssetCheckSpec(DISCRIMINATION, asset=LIVE, description="The serving version's live ROC-AUC keeps its test ROC-AUC within its interval."),
        dg.AssetCheckSpec(CALIBRATION, asset=LIVE, description="The serving version's live probabilities stay calibrated and beat the observed rate."),
    ],
    description="Each model version's ROC-AUC, PR-AUC, Brier, calibration and positive rate on the predictions it made whose outcomes came back, with bootstrap intervals, beside its test figures.",
)
def live_performance(
    context: dg.AssetExecutionContext,
    config: LivePerformanceConfig,
    warehouse: WarehouseResource,
    prediction_log: PredictionLogResource,
    mlflow: MlflowResource,
) -> dg.MaterializeResult:
    with warehouse.open() as store:
        update = live.update_joined(
            store, lambda ids: prediction_log.read(live.PREDICTION_COLUMNS, request_ids=ids), datetime.now(UTC)
        )
        if update.joined or update.removed:
            context.log.info(f"outcome files joined to the log: {list(update.joined)} ({update.rows} rows); taken out: {list(update.removed)}")
        decisions = store.query("SELECT * FROM promotion_decisions")
        measured = live.measure(
            store, live.test_figures(decisions), now=datetime.now(UTC), resamples=config.resamples, period=config.period
        )
    figures, periods = measured.figures, measured.periods
    # The version answering now: the one behind the newest logged prediction.
    newest = prediction_log.newest(["model_version"])
    serving = newest["model_version"][0] if newest.height else None
    replaced = _replaced(mlflow, serving)
    limits = config.limits()
    judged = [
        (DISCRIMINATION, live.judge_discrimination(figures, serving, limits) if serving else None),
        (CALIBRATION, live.judge_calibration(figures, serving, limits) if serving else None),
    ]
    checks = [
        dg.AssetCheckResult(
            check_name=name,
            passed=judgement is None or judgement.level == "ok",
            severity=SEVERITY.get(judgement.level if judgement else "warn", dg.AssetCheckSeverity.WARN),
            description="; ".join(judgement.findings) if judgement else "nothing has been predicted yet",
            metadata={"model_version": serving, "level": judgement.level if judgement else "ok"},
        )
        for name, judgement in judged
    ]
    worse = live.clearly_worse(figures, serving, replaced, limits) if serving and replaced else None
    links = _log_to_mlflow(mlflow, figures, context) if figures.height else {}
    shown = figures.select(
        "model_version", "metric", *(pl.col(c).round(4) for c in ("estimate", "lower", "upper", "test")), "outcomes"
    )
    metadata = {
        "dagster/row_count": figures.height,
        "outcomes_joined": measured.outcomes,
        "outcome_files_joined_now": ", ".join(update.joined) or "none",
        # A version none of whose outcomes changed keeps the figures computed before (live.measure).
        "versions_computed": ", ".join(f"v{v}" for v in measured.computed) or "none",
        "versions_kept": ", ".join(f"v{v}" for v in measured.kept) or "none",
        "serving_version": serving,
        "replaced_version": replaced,
        "clearly_worse_than_replaced": worse,
        "figures": dg.MetadataValue.md(markdown_table(shown, limit=70) if shown.height else "no version has outcomes of both kinds yet"),
        # Read by the degradation sensor: each version's ROC-AUC with its interval.
        "roc_auc": dg.MetadataValue.json(
            {r["model_version"]: [r["estimate"], r["lower"], r["upper"], r["outcomes"]]
             for r in figures.filter(pl.col("metric") == "roc_auc").iter_rows(named=True)}  # fmt: skip
        ),
        **({"mlflow_runs": dg.MetadataValue.md("\n".join(f"- v{v}: {url}" for v, url in links.items()))} if links else {}),
    }
    if periods.height:
        with tempfile.TemporaryDirectory() as folder:
            from readmission_platform.lib.plots import live_plot

            image = base64.b64encode(live_plot(periods, Path(folder) / "live.png").read_bytes()).decode()
        metadata["over_time"] = dg.MetadataValue.md(f"![live figures over time](data:image/png;base64,{image})")
    return dg.MaterializeResult(metadata=metadata, check_results=checks)
