import json
from datetime import UTC, datetime

import dagster as dg
import polars as pl

from readmission_platform.defs import run_tags
from readmission_platform.defs.ingestion.sensors import new_files, run_key
from readmission_platform.defs.outcomes.live import CALIBRATION, DISCRIMINATION, LIVE
from readmission_platform.defs.partitions import latest_evaluation, outcome_files
from readmission_platform.defs.resources import DegradationPolicy, LandingResource, MlflowResource, WarehouseResource
from readmission_platform.defs.training import sensors as training
from readmission_platform.lib.landing import batch_id_for
from readmission_platform.lib.outcomes import OUTCOMES
from readmission_platform.lib.promotion import (
    DECISION_SCHEMA,
    RETRAIN_REQUESTED,
    ROLLBACK_PROPOSED,
    live_action_row,
    record_decisions,
    rollback_row,
)

ingest_outcomes_job = dg.define_asset_job(
    "ingest_outcomes",
    selection=dg.AssetSelection.assets(OUTCOMES),
    description="outcomes, with its check, for one landed file of outcomes.",
)
live_performance_job = dg.define_asset_job(
    "measure_live_performance",
    selection=dg.AssetSelection.assets(LIVE),
    description="live_performance and its checks, over every outcome and the whole prediction log.",
)


@dg.sensor(
    job=ingest_outcomes_job,
    minimum_interval_seconds=5,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Makes each new or changed file in landing/outcomes/ a partition of `outcome_files` and runs it.",
)
def outcome_sensor(context: dg.SensorEvaluationContext, landing: LandingResource) -> dg.SensorResult:
    seen: dict[str, dict] = json.loads(context.cursor) if context.cursor else {}
    existing = set(context.instance.get_dynamic_partitions(outcome_files.name))
    new_keys: list[str] = []
    run_requests = []
    for path, digest in new_files(landing.outcomes_path, seen, context.log):
        key = batch_id_for(path)
        if key not in existing and key not in new_keys:
            new_keys.append(key)
        run_requests.append(
            dg.RunRequest(run_key=run_key(key, seen[path.name]), partition_key=key, tags={run_tags.SOURCE_FILE: path.name, run_tags.SHA: digest})
        )
    return dg.SensorResult(
        run_requests=run_requests,
        dynamic_partitions_requests=[outcome_files.build_add_request(new_keys)] if new_keys else [],
        cursor=json.dumps(seen, sort_keys=True),
    )


def _record(decisions: list[dict], warehouse: WarehouseResource) -> None:
    with warehouse.open() as store:
        record_decisions(store, pl.DataFrame(decisions, schema=DECISION_SCHEMA))


@dg.sensor(
    jobs=[live_performance_job, training.retrain_job],
    minimum_interval_seconds=30,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Measures live performance again when outcomes arrived; when its checks fail, requests a retrain, and "
    "when the serving version is clearly worse live than the one it replaced, proposes (or makes) a rollback.",
)
def live_performance_sensor(
    context: dg.SensorEvaluationContext,
    warehouse: WarehouseResource,
    mlflow: MlflowResource,
    degradation_policy: DegradationPolicy,
) -> dg.SensorResult:
    # Cursor: the newest outcomes materialization measured, check evaluation and live_performance materialization acted on.
    cursor = {"outcomes": 0, "checks": 0, "live": 0} | (json.loads(context.cursor) if context.cursor else {})
    instance = context.instance
    requests: list[dg.RunRequest] = []
    decisions: list[dict] = []
    now = datetime.now(UTC)

    newest = instance.fetch_materializations(dg.AssetKey(OUTCOMES), limit=1, ascending=False).records
    measuring = instance.get_runs(dg.RunsFilter(job_name=live_performance_job.name, statuses=training.IN_FLIGHT), limit=1)
    if newest and newest[0].storage_id > cursor["outcomes"] and not measuring:
        requests.append(
            dg.RunRequest(
                job_name=live_performance_job.name,
                run_key=f"outcomes:{newest[0].storage_id}",
                tags={run_tags.AFTER_OUTCOMES: newest[0].asset_materialization.partition},
            )
        )
        cursor["outcomes"] = newest[0].storage_id

    failed = []
    for name in (DISCRIMINATION, CALIBRATION):  # discrimination first
        record = latest_evaluation(instance, dg.AssetCheckKey(dg.AssetKey(LIVE), name))
        evaluation = record.event.asset_check_evaluation if record is not None else None
        if evaluation is not None and record.id > cursor["checks"] and not evaluation.passed:
            failed.append((record, evaluation))
    if failed:
        cursor["checks"] = max(record.id for record, _ in failed)
        version = failed[0][1].metadata["model_version"].value
        findings = "; ".join(evaluation.description for _, evaluation in failed)
        if instance.get_runs(dg.RunsFilter(job_name=training.retrain_job.name, statuses=training.IN_FLIGHT), limit=1):
            context.log.info(f"live performance of v{version} fell short, and a retrain is already under way: {findings}")
        else:
            requests.append(
                dg.RunRequest(job_name=training.retrain_job.name, run_key=f"live:{cursor['checks']}", tags={run_tags.TRIGGER: "live_performance"})
            )
            reason = f"Live performance of production v{version} fell short; retrain requested: {findings}"
            decisions.append(live_action_row(action=RETRAIN_REQUESTED, version=version, replaced=None, reason=reason, now=now))

    measured = next(iter(instance.fetch_materializations(dg.AssetKey(LIVE), limit=1, ascending=False).records), None)
    if measured is not None and measured.storage_id > cursor["live"]:
        cursor["live"] = measured.storage_id
        metadata = measured.asset_materialization.metadata
        worse = getattr(metadata.get("clearly_worse_than_replaced"), "value", None)
        if worse:
            version, replaced = metadata["serving_version"].value, metadata["replaced_version"].value
            production = mlflow.registry().production()
            if production is None or str(production.version) != version:
                context.log.info(f"v{version} is no longer in production; no rollback: {worse}")
            elif degradation_policy.auto_rollback:
                reason = f"automatic rollback: {worse}"
                withdrawn, restored = mlflow.registry().rollback(reason=reason)
                decisions.append(rollback_row(replaced=withdrawn, restored=restored, reason=reason, now=now))
            else:
                reason = (f"Rollback of production v{version} to v{replaced} proposed: {worse}. "
                          "Run `readmission rollback --reason …` to make it (automatic rollback is off).")  # fmt: skip
                decisions.append(live_action_row(action=ROLLBACK_PROPOSED, version=version, replaced=replaced, reason=reason, now=now))
    if decisions:
        _record(decisions, warehouse)
        for row in decisions:
            context.log.warning(row["reason"])
    return dg.SensorResult(run_requests=requests, cursor=json.dumps(cursor))
