import json

import dagster as dg

from readmission_platform.defs.ingestion.sensors import SHA_TAG, SOURCE_FILE_TAG, new_files
from readmission_platform.defs.partitions import outcome_files
from readmission_platform.defs.resources import LandingResource
from readmission_platform.lib.landing import batch_id_for

ingest_outcomes_job = dg.define_asset_job(
    "ingest_outcomes",
    selection=dg.AssetSelection.assets("outcomes"),
    description="outcomes, with its check, for one landed file of outcomes.",
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
            dg.RunRequest(run_key=f"{key}:{digest[:16]}", partition_key=key, tags={SOURCE_FILE_TAG: path.name, SHA_TAG: digest})
        )
    return dg.SensorResult(
        run_requests=run_requests,
        dynamic_partitions_requests=[outcome_files.build_add_request(new_keys)] if new_keys else [],
        cursor=json.dumps(seen, sort_keys=True),
    )
