import dagster as dg

from readmission_platform.defs.partitions import latest_by_partition
from readmission_platform.defs.resources import PredictionLogResource
from readmission_platform.lib.outcomes import OUTCOMES
from readmission_platform.lib.pipeline import RAW

history_job = dg.define_asset_job(
    "update_patient_history", selection=dg.AssetSelection.assets("patient_history"),
    description="Every patient's history state, from every loaded batch and returned outcome, written where the service looks it up.",
)  # fmt: skip


@dg.sensor(
    job=history_job,
    minimum_interval_seconds=10,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Brings the service's patient history up to date once a batch is loaded (or loaded again), or outcomes of its predictions come back.",
)
def history_sensor(context: dg.SensorEvaluationContext, prediction_log: PredictionLogResource):
    if not prediction_log.patient_key:
        return dg.SkipReason("READMISSION_PATIENT_KEY is not set: no patient history is kept for the service")
    loaded = latest_by_partition(context.instance, RAW)
    if not loaded:
        return dg.SkipReason("no raw_batches partition has been materialized yet")
    # One run per state of the loaded batches and outcome files: a batch loaded again, or outcomes that came back, are
    # a new state, and history is computed anew.
    records = [*loaded.values(), *latest_by_partition(context.instance, OUTCOMES).values()]
    return dg.RunRequest(run_key=f"history_inputs:{max(record.storage_id for record in records)}")
