"""Monitoring's sensors and schedule: failed runs and failed asset checks posted to Alertmanager, so they reach the
receivers of the service's alerts; the daily serving drift."""

from __future__ import annotations

import json
from datetime import UTC, timedelta

import dagster as dg

from readmission_platform.defs import run_tags
from readmission_platform.defs.monitoring.assets import serving_drift
from readmission_platform.defs.resources import AlertmanagerResource
from readmission_platform.ops.spec import PIPELINE_ALERTS

RUN, CHECK = PIPELINE_ALERTS["run"], PIPELINE_ALERTS["check"]
# Executions read per check and tick: more than a tick's worth.
CHECKS_PER_TICK = 200


@dg.run_failure_sensor(
    name="alert_on_run_failure",
    default_status=dg.DefaultSensorStatus.RUNNING,
    minimum_interval_seconds=30,
    description="Posts every failed run to Alertmanager (READMISSION_ALERTMANAGER_URL); unset, it logs and skips.",
)
def alert_on_run_failure(context: dg.RunFailureSensorContext, alertmanager: AlertmanagerResource) -> None:
    run = context.dagster_run
    if not alertmanager.url:
        context.log.info("run %s failed; no Alertmanager URL is set (READMISSION_ALERTMANAGER_URL): not posted", run.run_id)
        return
    partition = run.tags.get(run_tags.PARTITION, "")
    alertmanager.post(
        [
            alertmanager.alert(
                RUN.name, RUN.severity, RUN.summary, RUN.runbook,
                labels={"job_name": run.job_name, "run_id": run.run_id, **({"partition": partition} if partition else {})},
                description=context.failure_event.message or f"run {run.run_id} of {run.job_name} failed",
                run_id=run.run_id,
            )  # fmt: skip
        ]
    )


@dg.sensor(
    name="alert_on_check_failure",
    default_status=dg.DefaultSensorStatus.RUNNING,
    minimum_interval_seconds=30,
    description="Posts every failed asset check (blocking data errors, drift, live performance) to Alertmanager.",
)
def alert_on_check_failure(context: dg.SensorEvaluationContext, alertmanager: AlertmanagerResource) -> dg.SkipReason:
    # The cursor: the execution id up to which every evaluation was seen, and the ids past it already seen (an
    # execution is stored when planned and completed later, so a newer one can complete before an older one).
    keys = list(context.repository_def.asset_checks_defs_by_key)
    history = {key: context.instance.event_log_storage.get_asset_check_execution_history(key, limit=CHECKS_PER_TICK)
               for key in keys}  # fmt: skip
    records = sorted((r for rs in history.values() for r in rs), key=lambda r: r.id)
    if context.cursor is None:  # as a run status sensor does, it watches from its first tick on, not the history
        context.update_cursor(json.dumps({"after": max((r.id for r in records), default=0), "seen": []}))
        return dg.SkipReason("watching check evaluations from now on")
    cursor = json.loads(context.cursor)
    new = [r for r in records if r.id > cursor["after"] and r.id not in cursor["seen"]]
    done = [r for r in new if r.event is not None and r.event.dagster_event_type == dg.DagsterEventType.ASSET_CHECK_EVALUATION]
    planned = [r.id for r in new if r not in done]
    after = min(planned) - 1 if planned else max((r.id for r in records), default=cursor["after"])
    seen = sorted({*cursor["seen"], *(r.id for r in done)} - set(range(after + 1)))
    context.update_cursor(json.dumps({"after": max(after, cursor["after"]), "seen": seen}))
    failed = [(r, e) for r in done if not (e := r.event.asset_check_evaluation).passed]
    if not failed:
        return dg.SkipReason(f"{len(done)} checks evaluated since the last tick, none failed")
    if not alertmanager.url:
        return dg.SkipReason(f"{len(failed)} checks failed; no Alertmanager URL is set (READMISSION_ALERTMANAGER_URL)")
    alertmanager.post(
        [
            alertmanager.alert(
                CHECK.name,
                CHECK.severity if evaluation.severity == dg.AssetCheckSeverity.ERROR else "warning",
                CHECK.summary,
                CHECK.runbook,
                labels={
                    "asset": evaluation.asset_key.to_user_string(),
                    "check": evaluation.check_name,
                    "check_severity": evaluation.severity.value,
                    **({"partition": evaluation.partition} if evaluation.partition else {}),
                },
                description=evaluation.description or f"{evaluation.check_name} failed",
                run_id=record.run_id,
            )
            for record, evaluation in failed
        ]
    )
    return dg.SkipReason(f"{len(failed)} failed checks posted to Alertmanager")


serving_drift_job = dg.define_asset_job(
    "serving_drift_daily", selection=[serving_drift], description="serving_drift of one UTC day."
)


@dg.schedule(
    job=serving_drift_job,
    cron_schedule="15 0 * * *",
    execution_timezone="UTC",
    default_status=dg.DefaultScheduleStatus.RUNNING,
    description="Measures the serving drift of the UTC day that just ended, a quarter of an hour after it.",
)
def serving_drift_schedule(context: dg.ScheduleEvaluationContext) -> dg.RunRequest:
    ended = (context.scheduled_execution_time.astimezone(UTC) - timedelta(days=1)).strftime("%Y-%m-%d")
    return dg.RunRequest(run_key=f"serving_drift:{ended}", partition_key=ended)
