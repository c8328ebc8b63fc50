"""When a retrain happens and what it trains on: retrain_sensor, batch_drift against the production model's rows, the
training set's batches, the retrain path on PostgreSQL. Apart from test_training.py, so pytest-xdist runs both at once."""

from __future__ import annotations

from datetime import UTC, datetime

import dagster as dg
import polars as pl
import pytest

from readmission_platform.defs.ingestion.assets import batch_tables
from readmission_platform.defs.resources import MlflowResource, RetrainPolicy
from readmission_platform.defs.training.assets import training_set
from readmission_platform.defs.training.sensors import retrain_sensor
from readmission_platform.lib.drift import PSI_SIGNIFICANT
from readmission_platform.lib.pipeline import process_batch
from readmission_platform_tests.defs.conftest import TWO_FAMILIES, checks_of, ingest, metadata, retrain


@pytest.mark.parametrize("platform", ["duckdb"], indirect=True)
def test_drift_is_measured_against_the_production_models_training_rows(platform, instance, resources, training_batches):
    first = ingest(platform, instance, resources, training_batches[0], "batch_0001")
    assert metadata(first, "batch_drift")["reference_version"] is None  # nothing in production yet
    ingest(platform, instance, resources, training_batches[1], "batch_0002")
    retrain(instance, resources)

    later = ingest(platform, instance, resources, training_batches[3], "batch_0004")

    drift = metadata(later, "batch_drift")
    assert drift["reference_version"] == "1" and drift["max_psi"] > 0
    rows = platform.warehouse.read_table("batch_drift", "batch_0004")
    assert rows.height == 45 and set(rows["reference_version"]) == {"1"}
    check = checks_of(later)["check_batch_drift_psi"]
    assert check.severity == dg.AssetCheckSeverity.WARN
    assert check.passed == (drift["max_psi"] < PSI_SIGNIFICANT)
    assert drift["reference_batch"] == "batch_0002"  # the newest batch v1 was trained on


@pytest.mark.parametrize("platform", ["duckdb"], indirect=True)
def test_the_training_set_holds_only_batches_dagster_recorded_and_names_the_others(platform, instance, resources, training_batches):
    for i, data in enumerate(training_batches[:2], start=1):
        ingest(platform, instance, resources, data, f"batch_{i:04d}")
    # batch_0003 as a run killed between the warehouse's commit and Dagster's record of it leaves it: stored, unrecorded.
    with platform.warehouse as store:
        process_batch(store, "batch_0003", content=training_batches[2], source_file="batch_0003.csv", now=datetime.now(UTC))

    def training_set_metadata() -> dict:
        result = dg.materialize([training_set, batch_tables], selection=[training_set], resources=resources, instance=instance)
        return metadata(result, "training_set")

    before = training_set_metadata()
    assert before["batches"] == "batch_0001, batch_0002" and before["batches_left_out"] == "batch_0003"
    assert set(platform.warehouse.read_table("training_set")["batch_id"]) == {"batch_0001", "batch_0002"}

    ingest(platform, instance, resources, training_batches[2], "batch_0003")  # the run's retry records it
    after = training_set_metadata()
    assert after["batches"] == "batch_0001, batch_0002, batch_0003" and after["batches_left_out"] == "none"
    assert after["dagster/row_count"] == platform.warehouse.read_table("features").height


def tick(instance, mlflow, cursor=None, policy=None):
    context = dg.build_sensor_context(
        instance=instance, cursor=cursor, resources={"mlflow": mlflow, "retrain_policy": policy or RetrainPolicy()}
    )
    return retrain_sensor(context)


@pytest.mark.parametrize("platform", ["duckdb"], indirect=True)
def test_the_retrain_sensor_asks_for_a_run_after_new_batches_and_not_before(platform, instance, resources, mlflow, training_batches):
    assert isinstance(tick(instance, mlflow), dg.SkipReason)  # nothing ingested yet

    ingest(platform, instance, resources, training_batches[0], "batch_0001")
    first = tick(instance, mlflow)
    assert isinstance(first, dg.RunRequest) and first.tags["readmission/new_batches"] == "batch_0001"
    assert isinstance(tick(instance, mlflow, policy=RetrainPolicy(min_new_rows=10_000)), dg.SkipReason)

    ingest(platform, instance, resources, training_batches[1], "batch_0002")
    retrain(instance, resources)  # production now holds batches 1 and 2
    after_training = tick(instance, mlflow)
    assert isinstance(after_training, dg.SkipReason) and "0 new or reloaded batches" in after_training.skip_message

    ingest(platform, instance, resources, training_batches[2], "batch_0003")
    again = tick(instance, mlflow)
    assert isinstance(again, dg.RunRequest)
    assert again.tags["readmission/new_batches"] == "batch_0003" and again.tags["readmission/newest_batch"] == "batch_0003"
    assert again.run_key != first.run_key
    assert tick(instance, mlflow).run_key == again.run_key  # the same data never makes a second run

    # Batch 3's retrain trained on batches 1-3 whatever it decided; batch 4 lands while it runs, so it trains on 1-4.
    ingest(platform, instance, resources, training_batches[3], "batch_0004")
    retrain(instance, resources)
    assert mlflow.registry().versions()[0].tags["batch_ids"] == "batch_0001,batch_0002,batch_0003,batch_0004"
    after_coalesced = tick(instance, mlflow)  # the request's state (1-3) is gone, but its rows were trained on
    assert isinstance(after_coalesced, dg.SkipReason), after_coalesced
    assert "trained on these 4 batches as they are now" in after_coalesced.skip_message
    reloaded = ingest(platform, instance, resources, training_batches[3], "batch_0004")  # loaded again: new rows
    assert reloaded.success and isinstance(tick(instance, mlflow), dg.RunRequest)


@pytest.mark.parametrize("platform", ["duckdb"], indirect=True)
def test_a_batch_loaded_again_after_production_trained_on_it_retrains(platform, instance, resources, mlflow, training_batches):
    ingest(platform, instance, resources, training_batches[0], "batch_0001")
    retrain(instance, resources)  # the first model: production, trained on batch 1
    assert isinstance(tick(instance, mlflow), dg.SkipReason)

    corrected = training_batches[0].replace(b"Caucasian", b"Hispanic", 1)
    assert ingest(platform, instance, resources, corrected, "batch_0001").success

    reloaded = tick(instance, mlflow)
    assert isinstance(reloaded, dg.RunRequest), reloaded
    assert reloaded.tags["readmission/new_batches"] == "batch_0001"


@pytest.mark.postgres
@pytest.mark.parametrize("platform", ["postgres"], indirect=True)
def test_the_retrain_path_on_postgresql_for_the_warehouse_and_mlflow(platform, instance, new_pg_database, tmp_path, training_batches):
    mlflow = MlflowResource(tracking_uri=new_pg_database("mlflow"), artifact_root=(tmp_path / "artifacts").as_uri())
    resources = platform.resources | {"mlflow": mlflow, "retrain_policy": RetrainPolicy()}
    for i, data in enumerate(training_batches[:3], start=1):
        ingest(platform, instance, resources, data, f"batch_{i:04d}")

    first = retrain(instance, resources)
    second = retrain(instance, resources)

    assert metadata(first, "promotion_decision")["production_version"] == "1"
    decided = metadata(second, "promotion_decision")
    assert metadata(second, "trained_model")["model_version"] == "2"
    # A promoted second model starts its rollout in shadow; production stays v1 either way.
    assert decided["production_version"] == "1"
    fresh = MlflowResource(tracking_uri=mlflow.tracking_uri).registry()  # read back through a new client
    assert str(fresh.production().version) == decided["production_version"]
    assert (fresh.rollout().version if fresh.rollout() else None) == ("2" if decided["promoted"] else None)
    assert platform.warehouse.read_table("promotion_decisions").height == 2


@pytest.mark.parametrize("platform", ["duckdb"], indirect=True)
def test_a_drifted_batch_retrains_even_when_too_few_rows_arrived(platform, instance, resources, mlflow, training_batches):
    for i, data in enumerate(training_batches[:2], start=1):
        ingest(platform, instance, resources, data, f"batch_{i:04d}")
    retrain(instance, resources)
    later = ingest(platform, instance, resources, training_batches[3], "batch_0004")
    max_psi = metadata(later, "batch_drift")["max_psi"]
    # New data alone would wait for five batches.
    quiet = tick(instance, mlflow, policy=RetrainPolicy(min_new_batches=5, drift_psi_threshold=max_psi + 1))
    drifted = tick(instance, mlflow, policy=RetrainPolicy(min_new_batches=5, drift_psi_threshold=max_psi))

    assert isinstance(quiet, dg.SkipReason) and "no batch drifted" in quiet.skip_message
    assert isinstance(drifted, dg.RunRequest)
    assert drifted.tags["readmission/trigger"] == "drift" and drifted.tags["readmission/drifted_batches"] == "batch_0004"


def without_payer(data: bytes) -> bytes:
    """A batch file's text with `payer_code` unrecorded ('?') for two encounters in five."""
    rows = pl.read_csv(data, infer_schema=False)
    lost = pl.col("encounter_id").cast(pl.Int64) % 5 < 2
    return rows.with_columns(pl.when(lost).then(pl.lit("?")).otherwise(pl.col("payer_code")).alias("payer_code")).write_csv().encode()


@pytest.mark.parametrize("platform", ["duckdb"], indirect=True)
def test_the_default_drift_trigger_stays_off_for_an_ordinary_batch_and_fires_on_a_planted_shift(platform, instance, resources, mlflow, steady_batches):
    for i, data in enumerate(steady_batches[:2], start=1):
        ingest(platform, instance, resources, data, f"batch_{i:04d}")
    retrain(instance, resources, run_config=TWO_FAMILIES)  # the linear model alone fails the gates on these batches
    policy = RetrainPolicy(min_new_batches=5)  # new data alone would wait for five batches

    ordinary = ingest(platform, instance, resources, steady_batches[2], "batch_0003")
    quiet = tick(instance, mlflow, policy=policy)
    planted = ingest(platform, instance, resources, without_payer(steady_batches[3]), "batch_0004")
    drifted = tick(instance, mlflow, policy=policy)

    assert metadata(ordinary, "batch_drift")["max_psi"] < PSI_SIGNIFICANT and checks_of(ordinary)["check_batch_drift_psi"].passed
    assert isinstance(quiet, dg.SkipReason) and "no batch drifted" in quiet.skip_message
    assert metadata(planted, "batch_drift")["drifted_features"] == "payer_code"
    assert not checks_of(planted)["check_batch_drift_psi"].passed
    assert isinstance(drifted, dg.RunRequest)
    assert drifted.tags["readmission/trigger"] == "drift" and drifted.tags["readmission/drifted_batches"] == "batch_0004"
