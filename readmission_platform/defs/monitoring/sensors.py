from datetime import UTC, timedelta

import dagster as dg

from readmission_platform.defs.monitoring.assets import serving_drift
from readmission_platform.defs.partitions import serving_days

serving_drift_job = dg.define_asset_job(
    "serving_drift_daily", selection=[serving_drift], partitions_def=serving_days, description="serving_drift of one UTC day."
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
