import json
import logging
import time
from pathlib import Path

import dagster as dg

from readmission_platform.defs import run_tags
from readmission_platform.defs.partitions import batches
from readmission_platform.defs.resources import LandingResource
from readmission_platform.lib.landing import ambiguity, batch_id_for, content_hash, landed_files

ingest_batch_job = dg.define_asset_job(
    "ingest_batch",
    selection=dg.AssetSelection.assets("raw_batches", "clean_batches", "features", "batch_drift"),
    description="raw_batches → clean_batches → features → batch_drift for one landed batch, with their checks.",
)


# Failed runs looked at each tick for a crash left unretried; far more than batches land between two ticks.
RECENT_FAILURES = 50
# How long the retry daemon has to retry a crashed run it said it would before the sensor runs the batch again; it
# retries within seconds when it sees the failure.
RETRY_GRACE_SECONDS = 90


def crashes_left_unretried(
    instance: dg.DagsterInstance, seen: dict[str, dict], now: float | None = None
) -> list[dg.RunRequest]:
    """A new run for each batch whose newest run died in a crash that the retry daemon gave up on, or has not retried
    within `RETRY_GRACE_SECONDS` though it said it would, while the batch's crash retries (run_retries.max_retries)
    last.

    The retry daemon marks a run it fails to re-execute (its code server is down) as not to be retried, for good; and
    a failure it should retry can go unseen by it (seen once under `make chaos`: a run failed by run monitoring while
    the code server was down, tagged to be retried, was never retried). A batch failed in an asset (a bad file, a
    blocking check) is not run again, nor one whose file changed since.
    """
    if not instance.run_retries_enabled:
        return []
    now = time.time() if now is None else now
    records = instance.get_run_records(
        dg.RunsFilter(job_name=ingest_batch_job.name, statuses=[dg.DagsterRunStatus.FAILURE]), limit=RECENT_FAILURES
    )
    failed = [
        record.dagster_run
        for record in records
        if record.dagster_run.tags.get(run_tags.WILL_RETRY) == "false"
        or (
            record.dagster_run.tags.get(run_tags.WILL_RETRY) == "true"
            and now - (record.end_time or record.update_timestamp.timestamp()) > RETRY_GRACE_SECONDS
        )
    ]
    requests = []
    for run in failed:
        if run.tags.get(run_tags.FAILURE_REASON) == run_tags.STEP_FAILURE or run_tags.AUTO_RETRY_RUN_ID in run.tags:
            continue
        landed = seen.get(run.tags.get(run_tags.SOURCE_FILE, ""))
        if landed is None or landed["sha256"] != run.tags.get(run_tags.SHA):
            continue
        batch_id = run.tags[run_tags.PARTITION]
        # The runs of this content only: those of the file's earlier contents were not attempts at it.
        attempts = instance.get_runs(
            dg.RunsFilter(job_name=ingest_batch_job.name, tags={run_tags.PARTITION: batch_id, run_tags.SHA: run.tags[run_tags.SHA]})
        )
        if attempts[0].run_id != run.run_id or len(attempts) > instance.run_retries_max_retries:
            continue
        requests.append(
            dg.RunRequest(
                # One request per crashed run: the next crash of this batch gets one of its own.
                run_key=f"{batch_id}:{run.tags[run_tags.SHA][:16]}:after:{run.run_id}",
                partition_key=batch_id,
                tags={run_tags.SOURCE_FILE: run.tags[run_tags.SOURCE_FILE], run_tags.SHA: run.tags[run_tags.SHA], run_tags.AFTER_CRASH_OF: run.run_id},
            )
        )
    return requests


def new_files(folder: Path, seen: dict[str, dict], log: logging.Logger) -> list[tuple[Path, str]]:
    """Each file landed in `folder` that is new or changed since `seen` (a sensor's cursor: file name → its size,
    mtime, sha256 and how many contents it has had, updated here), with its sha256. Unchanged files are not reread; a
    file with the content of another one already seen is skipped with a warning, and so is one whose batch id another
    file also makes, until one of them is renamed."""
    changed = []
    files = landed_files(folder)
    by_id: dict[str, list[Path]] = {}
    for path in files:
        by_id.setdefault(batch_id_for(path), []).append(path)
    for path in files:
        stat = path.stat()
        previous = seen.get(path.name)
        if previous and (previous["size"], previous["mtime_ns"]) == (stat.st_size, stat.st_mtime_ns):
            continue
        if len(same_id := by_id[batch_id_for(path)]) > 1:  # its entry is not updated: the next tick looks again
            log.warning(f"{path.name} skipped: {ambiguity(batch_id_for(path), same_id)}")
            continue
        digest = content_hash(path.read_bytes())
        contents = previous.get("contents", 1) if previous else 0
        if previous and previous["sha256"] == digest:
            seen[path.name] = previous | {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
            continue
        seen[path.name] = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": digest, "contents": contents + 1}
        twin = next((name for name, s in seen.items() if name != path.name and s["sha256"] == digest), None)
        if twin is not None:
            log.warning(f"{path.name} has the same content as {twin}, which is already ingested; skipped")
            continue
        changed.append((path, digest))
    return changed


def run_key(key: str, landed: dict) -> str:
    """The run key of a landed file's content (`landed`: its entry in `new_files`' cursor): its partition, hash and
    how many contents the file has had. A sensor re-evaluated after a crash asks again under the same key, which
    Dagster runs once; a content that comes back after another was ingested is a change of its own and runs again."""
    return f"{key}:{landed['sha256'][:16]}:{landed.get('contents', 1)}"


@dg.sensor(
    job=ingest_batch_job,
    minimum_interval_seconds=5,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Makes each new or changed file in the landing folder a partition of `batches` and runs it; runs again a batch whose crash was not retried.",
)
def landing_sensor(context: dg.SensorEvaluationContext, landing: LandingResource) -> dg.SensorResult:
    # Cursor: file name → its size, mtime and sha256 when last seen; unchanged files are not reread.
    seen: dict[str, dict] = json.loads(context.cursor) if context.cursor else {}
    existing = set(context.instance.get_dynamic_partitions(batches.name))
    new_keys: list[str] = []
    run_requests: list[dg.RunRequest] = []
    for path, digest in new_files(landing.path, seen, context.log):
        batch_id = batch_id_for(path)
        if batch_id not in existing and batch_id not in new_keys:
            new_keys.append(batch_id)
        run_requests.append(
            dg.RunRequest(
                run_key=run_key(batch_id, seen[path.name]),
                partition_key=batch_id,
                tags={run_tags.SOURCE_FILE: path.name, run_tags.SHA: digest},
            )
        )
    run_requests.extend(crashes_left_unretried(context.instance, seen))
    return dg.SensorResult(
        run_requests=run_requests,
        dynamic_partitions_requests=[batches.build_add_request(new_keys)] if new_keys else [],
        cursor=json.dumps(seen, sort_keys=True),
    )
