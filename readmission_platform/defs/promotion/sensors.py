from datetime import UTC, datetime

import dagster as dg
import polars as pl

from readmission_platform.defs.resources import (
    MlflowResource,
    PredictionLogResource,
    RolloutPolicyResource,
    WarehouseResource,
)
from readmission_platform.lib.promotion import DECISION_SCHEMA, record_decisions

ROLLOUT = "model_rollout"
model_rollout = dg.AssetSpec(
    ROLLOUT,
    group_name="promotion",
    kinds={"mlflow"},
    description="The rollout of a promoted challenger (registry aliases shadow → canary → production); "
    "rollout_sensor records each step it takes, with its reason and the live signals behind it.",
)


@dg.sensor(
    minimum_interval_seconds=15,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Watches the candidate in shadow or canary on the prediction log since its stage began: advances it "
    "(shadow → canary steps → production) when healthy for long enough, rolls it back when its failures, latency, "
    "agreement with production, score distribution or live performance say so. Each step is a row of "
    "promotion_decisions and a materialization of model_rollout.",
)
def rollout_sensor(
    context: dg.SensorEvaluationContext,
    warehouse: WarehouseResource,
    mlflow: MlflowResource,
    prediction_log: PredictionLogResource,
    rollout_policy: RolloutPolicyResource,
) -> dg.SensorResult | dg.SkipReason:
    from readmission_platform.lib import rollout
    from readmission_platform.lib.registry import RolloutMoved

    now = datetime.now(UTC)
    registry = mlflow.registry()
    with warehouse.open() as store:
        figures = store.query("SELECT * FROM live_performance")
    read = lambda since: prediction_log.read(rollout.ROLLOUT_COLUMNS, since=since)  # noqa: E731
    assessed = rollout.assess(registry, read, figures, rollout_policy.policy(), now)
    if assessed is None:
        return dg.SkipReason("no candidate in shadow or canary")
    current, signals, step = assessed
    if step.action == rollout.WAIT:
        return dg.SkipReason(step.reason)
    try:
        row = rollout.act(registry, current, step, signals, now)
    except RolloutMoved as moved:  # a new challenger took the candidate's place while it was judged
        return dg.SkipReason(f"{moved}; the next tick judges the rollout under way")
    with warehouse.open() as store:
        record_decisions(store, pl.DataFrame([row], schema=DECISION_SCHEMA))
    (context.log.warning if step.action == rollout.ROLLBACK else context.log.info)(step.reason)
    return dg.SensorResult(
        asset_events=[
            dg.AssetMaterialization(
                ROLLOUT,
                description=step.reason,
                metadata={
                    "action": row["action"],
                    "candidate_version": current.version,
                    "from_stage": current.stage if current.stage == rollout.SHADOW else f"canary at {current.share:.0%}",
                    "to_stage": step.stage or "rolled back",
                    "share": step.share,
                    "production_version": row["production_version"],
                    "reason": step.reason,
                    "requests": signals.requests,
                    "failed": signals.errors,
                    "latency_p95_ms": signals.latency_p95_ms,
                    "agreement": signals.agreement,
                    "psi": signals.psi,
                    "psi_reference": signals.reference,
                    "live": signals.live or "no matured finding",
                    "mlflow_model": dg.MetadataValue.url(registry.version_url(current.version)),
                },
            )
        ]
    )
