"""training_set → trained_model → promotion_decision, batch_drift and retrain_sensor on real stores."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from datetime import UTC, datetime

import dagster as dg
import mlflow as mlflow_module
import polars as pl
import pytest

from readmission_platform.defs.ingestion.assets import batch_tables
from readmission_platform.defs.promotion.assets import promotion_decision
from readmission_platform.defs.resources import MlflowResource, RetrainPolicy
from readmission_platform.defs.training.assets import trained_model, training_set
from readmission_platform.defs.training.sensors import retrain_sensor
from readmission_platform.lib.drift import PSI_SIGNIFICANT
from readmission_platform.lib.pipeline import process_batch
from readmission_platform_tests.defs.conftest import FAST, RETRAIN, TWO_FAMILIES, checks_of, ingest, metadata, retrain


@pytest.mark.parametrize("platform", ["duckdb"], indirect=True)
def test_the_first_model_is_tracked_registered_and_promoted(platform, instance, resources, mlflow, training_batches):
    for i, data in enumerate(training_batches[:3], start=1):
        ingest(platform, instance, resources, data, f"batch_{i:04d}")

    result = retrain(instance, resources, TWO_FAMILIES)

    trained, decided = metadata(result, "trained_model"), metadata(result, "promotion_decision")
    assert trained["model_version"] == "1" and trained["batch_ids"] == "batch_0001,batch_0002,batch_0003"
    assert "#/experiments/" in trained["mlflow_run"]
    assert "logistic_regression" in trained["candidates"] and "hist_gradient_boosting" in trained["candidates"]
    assert decided["promoted"] is True and decided["production_version"] == "1"
    assert "first production model" in decided["reason"]
    checks = checks_of(result)
    assert checks["check_training_set_patient_overlap"].passed
    assert checks["check_promotion_decision_gates"].passed, checks["check_promotion_decision_gates"].description

    registry = mlflow.registry()
    production = registry.production()
    assert str(production.version) == "1" and production.tags["batch_ids"] == trained["batch_ids"]
    runs = mlflow_module.MlflowClient(mlflow.tracking_uri).search_runs([registry.experiment_id])
    assert sorted(r.data.params["family"] for r in runs) == ["hist_gradient_boosting", "logistic_regression"]
    assert all(r.data.tags["dagster_run_id"] == result.run_id for r in runs)
    # The challenger's run has the plots, importances, subgroups and model; the other's its figures and settings only.
    client = mlflow_module.MlflowClient(mlflow.tracking_uri)
    artifacts = {r.info.run_id: {a.path for a in client.list_artifacts(r.info.run_id)} for r in runs}
    assert {"roc.png", "precision_recall.png", "calibration.png", "feature_importances.csv", "subgroups.csv"} <= artifacts[production.run_id]
    (other,) = [r for r in runs if r.info.run_id != production.run_id]
    assert artifacts[other.info.run_id] == set() and not other.outputs.model_outputs
    assert other.data.metrics["validation_roc_auc"] > 0 and "grid" in other.data.tags
    challenger_run = mlflow_module.MlflowClient(mlflow.tracking_uri).get_run(production.run_id)
    assert challenger_run.data.metrics["test_roc_auc"] == pytest.approx(decided["production_test_roc_auc"])
    decisions = platform.warehouse.read_table("promotion_decisions")
    assert decisions.height == 1 and decisions["promoted"].to_list() == [True]


@pytest.mark.parametrize("platform", ["duckdb"], indirect=True)
def test_a_failing_gate_keeps_production_and_fails_the_blocking_check(platform, instance, resources, mlflow, training_batches):
    for i, data in enumerate(training_batches[:3], start=1):
        ingest(platform, instance, resources, data, f"batch_{i:04d}")
    retrain(instance, resources)

    strict = {"ops": FAST["ops"] | {"promotion_decision": {"config": {"min_test_roc_auc": 0.99}}}}
    result = retrain(instance, resources, strict, raise_on_error=False)

    decided = metadata(result, "promotion_decision")
    assert decided["promoted"] is False and decided["production_version"] == "1"
    assert "below the gate 0.99" in decided["reason"]
    gates = checks_of(result)["check_promotion_decision_gates"]
    assert not gates.passed and "does not pass the gates" in gates.description
    assert str(mlflow.registry().production().version) == "1"
    assert platform.warehouse.read_table("promotion_decisions")["promoted"].to_list() == [True, False]


@pytest.mark.parametrize("platform", ["duckdb"], indirect=True)
def test_deciding_again_on_a_promoted_challenger_keeps_it_and_judges_it_as_first_decided(platform, instance, resources, mlflow, training_batches):
    for i, data in enumerate(training_batches[:3], start=1):
        ingest(platform, instance, resources, data, f"batch_{i:04d}")
    retrain(instance, resources)

    # What the retry of a run killed after moving the alias does: decide on the same challenger once more.
    again = dg.materialize([promotion_decision, trained_model], selection=[promotion_decision], resources=resources, instance=instance)

    decided = metadata(again, "promotion_decision")
    assert decided["promoted"] is True and decided["production_version"] == "1" and decided["challenger_version"] == "1"
    assert "first production model" in decided["reason"] and decided["previous_production_version"] is None
    assert str(mlflow.registry().production().version) == "1"


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
    assert isinstance(after_training, dg.SkipReason) and "0 new batches" in after_training.skip_message

    ingest(platform, instance, resources, training_batches[2], "batch_0003")
    again = tick(instance, mlflow)
    assert isinstance(again, dg.RunRequest)
    assert again.tags["readmission/new_batches"] == "batch_0003" and again.tags["readmission/newest_batch"] == "batch_0003"
    assert again.run_key != first.run_key
    assert tick(instance, mlflow).run_key == again.run_key  # the same data never makes a second run


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


@pytest.mark.parametrize("platform", ["duckdb"], indirect=True)
def test_a_retried_trained_model_ends_the_killed_attempts_runs_and_registers_once(platform, instance, resources, mlflow, training_batches, tmp_path):
    for i, data in enumerate(training_batches[:3], start=1):
        ingest(platform, instance, resources, data, f"batch_{i:04d}")
    first = retrain(instance, resources)
    registry = mlflow.registry()
    # A worker of the same run group killed while it logged a candidate: its MLflow run stays RUNNING.
    killed = subprocess.run([sys.executable, "-c", textwrap.dedent(f"""
        import os, signal, mlflow
        client = mlflow.MlflowClient({mlflow.tracking_uri!r})
        client.create_run({registry.experiment_id!r}, tags={{"dagster_run_group": {first.run_id!r}}})
        os.kill(os.getpid(), signal.SIGKILL)
        """)], check=False)  # fmt: skip
    assert killed.returncode == -9

    # The retry belongs to the first run's group; a run id of the group is what tells trained_model so.
    job = dg.Definitions(assets=RETRAIN, resources=resources, jobs=[dg.define_asset_job("retry", [trained_model])]).resolve_job_def("retry")
    with dg.instance_for_test() as elsewhere:
        retried = job.execute_in_process(instance=elsewhere, run_id=first.run_id, run_config=FAST)

    assert metadata(retried, "trained_model")["model_version"] == metadata(first, "trained_model")["model_version"] == "1"
    assert [str(v.version) for v in registry.versions()] == ["1"]
    statuses = {r.info.status for r in mlflow_module.MlflowClient(mlflow.tracking_uri).search_runs([registry.experiment_id])}
    assert statuses == {"FINISHED", "KILLED"}


@pytest.mark.parametrize("platform", ["duckdb"], indirect=True)
def test_each_decided_version_gets_a_model_card_in_its_run_and_in_what_model_tells(platform, instance, resources, mlflow, training_batches):
    from readmission_platform.lib.model_card import CARD_MARKDOWN, read_card
    from readmission_platform.serving.model import describe

    for i, data in enumerate(training_batches[:3], start=1):
        ingest(platform, instance, resources, data, f"batch_{i:04d}")
    result = retrain(instance, resources)

    registry = mlflow.registry()
    production = registry.production()
    card = read_card(registry.client, production.run_id)
    test_rows = int(production.tags["test_rows"])
    assert card["version"] == "1" and card["family"] == "logistic_regression" and card["data"]["rows"]["test"] == test_rows
    assert card["data"]["batches"] == ["batch_0001", "batch_0002", "batch_0003"]
    roc_auc = card["test_metrics"]["roc_auc"]
    assert roc_auc["lower"] < roc_auc["estimate"] < roc_auc["upper"]
    assert roc_auc["estimate"] == pytest.approx(metadata(result, "promotion_decision")["production_test_roc_auc"], abs=1e-4)
    assert 0.5 < card["calibration"]["slope"] < 2 and len(card["calibration"]["deciles"]) == 10
    assert {row["by"] for row in card["subgroups"]} == {"gender", "race", "age_band"}
    assert sum(row["rows"] for row in card["subgroups"] if row["by"] == "gender") == test_rows
    assert card["features"]["diag_1"] == ["diag_1_group"] and "encounter_id" in card["assumptions"][1]
    assert "Intended use" in metadata(result, "promotion_decision")["model_card"]
    markdown = registry.client.download_artifacts(production.run_id, CARD_MARKDOWN)
    assert "## Subgroups (test)" in open(markdown).read()
    assert describe(registry, "1")["model_card"] == card
