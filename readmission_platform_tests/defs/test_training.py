"""training_set → trained_model → promotion_decision on real stores: tracking, gates, retries and model cards."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import dagster as dg
import mlflow as mlflow_module
import pytest

from readmission_platform.defs.promotion.assets import promotion_decision
from readmission_platform.defs.training.assets import trained_model
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
