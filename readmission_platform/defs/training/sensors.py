import hashlib

import dagster as dg

from readmission_platform.defs import run_tags
from readmission_platform.defs.partitions import latest_by_partition, materialized_in_run_group
from readmission_platform.defs.resources import MlflowResource, RetrainPolicy

retrain_job = dg.define_asset_job(
    "retrain",
    selection=dg.AssetSelection.assets("training_set", "trained_model", "promotion_decision", "serving_bento"),
    description=(
        "Training set from every batch so far → candidates in MLflow → champion/challenger decision → "
        "the production model packed into a Bento."
    ),
)

TRAINING_SET = dg.AssetKey("training_set")
IN_FLIGHT = [
    dg.DagsterRunStatus.QUEUED,
    dg.DagsterRunStatus.NOT_STARTED,
    dg.DagsterRunStatus.STARTING,
    dg.DagsterRunStatus.STARTED,
]


def _trained_at(instance: dg.DagsterInstance, version) -> int | None:
    """The storage id of the training_set materialization a registered version was trained on (in the run, or run
    group, that registered it); None when its run is not on this instance."""
    run_id = version.tags.get("dagster_run_id") if version is not None else None
    found = materialized_in_run_group(instance, run_id, TRAINING_SET) if run_id else []
    return max((record.storage_id for record in found), default=None)


def _metadata_value(record: dg.EventLogRecord, key: str):
    value = record.asset_materialization.metadata.get(key)
    return getattr(value, "value", value)


@dg.sensor(
    job=retrain_job,
    minimum_interval_seconds=5,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Retrains on all batches so far when enough new feature rows arrived since the production "
    "model was trained, or a batch drifted from its training data.",
)
def retrain_sensor(context: dg.SensorEvaluationContext, mlflow: MlflowResource, retrain_policy: RetrainPolicy):
    if context.instance.get_runs(dg.RunsFilter(job_name=retrain_job.name, statuses=IN_FLIGHT), limit=1):
        return dg.SkipReason("a retrain run is already queued or running")
    batches = latest_by_partition(context.instance, "features")
    if not batches:
        return dg.SkipReason("no features partition has been materialized yet")
    from readmission_platform.lib.registry import trained_batches

    registry = mlflow.registry()
    production = registry.production()
    trained, trained_at = set(trained_batches(production)), _trained_at(context.instance, production)
    # New: not among production's batches, or loaded again after production's training set was read.
    new = {
        key: record for key, record in batches.items()
        if key not in trained or (trained_at is not None and record.storage_id > trained_at)
    }  # fmt: skip
    new_rows = sum(_metadata_value(record, "dagster/row_count") or 0 for record in new.values())
    drifted = {
        key: psi
        for key, record in latest_by_partition(context.instance, "batch_drift").items()
        if (psi := _metadata_value(record, "max_psi")) is not None and psi >= retrain_policy.drift_psi_threshold
        and _metadata_value(record, "reference_version") == (str(production.version) if production else None)
    }
    enough_new = len(new) >= retrain_policy.min_new_batches and new_rows >= retrain_policy.min_new_rows
    if not enough_new and not drifted:
        return dg.SkipReason(
            f"{len(new)} new or reloaded batches ({new_rows} rows) since production "
            f"{f'v{production.version}' if production else '(none)'}; retraining needs "
            f"{retrain_policy.min_new_batches} batches and {retrain_policy.min_new_rows} rows, and no batch drifted"
        )
    # A retrain reads every batch loaded when its training_set runs, not only those of its request: batches that landed
    # while it was queued were trained on already, and retraining on the same rows would register the same model again.
    newest = next(iter(registry.versions()), None)
    last_set = context.instance.fetch_materializations(TRAINING_SET, limit=1).records
    if (
        newest is not None and last_set and set(trained_batches(newest)) == set(batches)
        and max(record.storage_id for record in batches.values()) < last_set[0].storage_id
    ):  # fmt: skip
        return dg.SkipReason(
            f"v{newest.version} was trained on these {len(batches)} batches as they are now; nothing new to train on "
            "(launch the retrain job by hand to train on them again)"
        )
    # The same data never retrains twice: the key is the set of feature partitions as materialized now.
    state = ",".join(f"{key}:{record.storage_id}" for key, record in sorted(batches.items()))
    trigger = "drift" if drifted and not enough_new else "new_data"
    return dg.RunRequest(
        run_key=f"{trigger}:{hashlib.sha256(state.encode()).hexdigest()[:20]}",
        tags={
            run_tags.TRIGGER: trigger,
            run_tags.NEWEST_BATCH: max(batches),
            run_tags.NEW_BATCHES: ",".join(sorted(new)),
            run_tags.DRIFTED_BATCHES: ",".join(sorted(drifted)),
        },
    )
