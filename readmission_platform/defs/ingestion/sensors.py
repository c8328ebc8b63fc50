import json

import dagster as dg

from readmission_platform.defs.partitions import batches
from readmission_platform.defs.resources import LandingResource
from readmission_platform.lib.landing import batch_id_for, content_hash, landed_files

ingest_batch_job = dg.define_asset_job(
    "ingest_batch",
    selection=dg.AssetSelection.assets("raw_batches", "clean_batches", "features", "batch_drift"),
    description="raw_batches → clean_batches → features → batch_drift for one landed batch, with their checks.",
)


@dg.sensor(
    job=ingest_batch_job,
    minimum_interval_seconds=5,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Makes each new or changed file in the landing folder a partition of `batches` and runs it.",
)
def landing_sensor(context: dg.SensorEvaluationContext, landing: LandingResource) -> dg.SensorResult:
    # Cursor: file name → its size, mtime and sha256 when last seen; unchanged files are not reread.
    seen: dict[str, dict] = json.loads(context.cursor) if context.cursor else {}
    existing = set(context.instance.get_dynamic_partitions(batches.name))
    new_keys: list[str] = []
    run_requests: list[dg.RunRequest] = []
    for path in landed_files(landing.path):
        stat = path.stat()
        previous = seen.get(path.name)
        if previous and (previous["size"], previous["mtime_ns"]) == (stat.st_size, stat.st_mtime_ns):
            continue
        digest = content_hash(path.read_bytes())
        seen[path.name] = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": digest}
        if previous and previous["sha256"] == digest:
            continue
        twin = next((name for name, s in seen.items() if name != path.name and s["sha256"] == digest), None)
        if twin is not None:
            context.log.warning(f"{path.name} has the same content as {twin}, which is already ingested; skipped")
            continue
        batch_id = batch_id_for(path)
        if batch_id not in existing and batch_id not in new_keys:
            new_keys.append(batch_id)
        run_requests.append(
            dg.RunRequest(
                run_key=f"{batch_id}:{digest[:16]}",
                partition_key=batch_id,
                tags={"readmission/source_file": path.name, "readmission/sha256": digest},
            )
        )
    return dg.SensorResult(
        run_requests=run_requests,
        dynamic_partitions_requests=[batches.build_add_request(new_keys)] if new_keys else [],
        cursor=json.dumps(seen, sort_keys=True),
    )
