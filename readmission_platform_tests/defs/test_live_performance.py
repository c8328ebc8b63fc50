"""live_performance and its checks on a real warehouse, prediction log and MLflow store; the sensor that acts on them."""

from __future__ import annotations

from datetime import UTC, datetime

import dagster as dg
import numpy as np
import polars as pl
import pytest

from readmission_platform.defs.outcomes.live import CALIBRATION, DISCRIMINATION, LIVE, live_performance
from readmission_platform.defs.outcomes.sensors import live_performance_sensor
from readmission_platform.defs.resources import DegradationPolicy, MlflowResource, PredictionLogResource
from readmission_platform.lib.encounter import FIELDS
from readmission_platform.lib.outcomes import OUTCOME_SCHEMA, OUTCOMES
from readmission_platform.lib.promotion import DECISION_SCHEMA, RETRAIN_REQUESTED
from readmission_platform.serving.model import SMOKE_ENCOUNTERS
from readmission_platform.serving.prediction_log import write_predictions

SERVED = 2_000


@pytest.fixture
def served(platform, tmp_path) -> dict:
    """v3 promoted with test ROC-AUC 0.75, and 2,000 of its calibrated predictions in a real prediction log."""
    rng = np.random.default_rng(7)
    probability = rng.beta(1.2, 9, SERVED)
    url = f"sqlite:///{tmp_path / 'predictions.sqlite'}"
    encounter = {name: SMOKE_ENCOUNTERS[0].get(name) for name in FIELDS}
    write_predictions(url, (
        {"request_id": f"r{i}", "endpoint": "predict", "model_name": "readmission-classifier", "model_version": "3",
         "probability": float(p), "decision": bool(p >= 0.15), "risk_band": "low", "inputs": encounter}
        for i, p in enumerate(probability)
    ))  # fmt: skip
    decision = dict.fromkeys(DECISION_SCHEMA) | {
        "decided_at": datetime(2026, 3, 1, tzinfo=UTC), "action": "promoted", "promoted": True, "challenger_version": "3",
        "challenger_test_roc_auc": 0.75, "challenger_test_pr_auc": 0.28, "challenger_test_brier": 0.095,
    }  # fmt: skip
    platform.warehouse.append("promotion_decisions", DECISION_SCHEMA, pl.DataFrame([decision], schema=DECISION_SCHEMA))
    return {"url": url, "probability": probability, "readmitted": rng.random(SERVED) < probability}


def land_outcomes(platform, readmitted: np.ndarray) -> None:
    now = datetime.now(UTC)
    rows = pl.DataFrame({
        "batch_id": "outcomes_0001", "request_id": [f"r{i}" for i in range(SERVED)], "readmitted_30d": readmitted,
        "known_at": now, "source_file": "outcomes_0001.csv", "line_number": range(2, SERVED + 2), "ingested_at": now,
    }).cast(OUTCOME_SCHEMA)  # fmt: skip
    platform.warehouse.replace_batch({OUTCOMES: (OUTCOME_SCHEMA, rows)}, "outcomes_0001")


def measure(platform, served, tmp_path, instance, raise_on_error=True) -> dg.ExecuteInProcessResult:
    resources = platform.resources | {
        "prediction_log": PredictionLogResource(url=served["url"]),
        "mlflow": MlflowResource(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}", artifact_root=(tmp_path / "artifacts").as_uri()),
    }
    return dg.materialize([live_performance], resources=resources, instance=instance, raise_on_error=raise_on_error)


def act(platform, tmp_path, instance, cursor=None) -> dg.SensorResult:
    context = dg.build_sensor_context(
        instance=instance,
        cursor=cursor,
        resources={
            "warehouse": platform.resources["warehouse"],
            "mlflow": MlflowResource(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}", artifact_root=(tmp_path / "artifacts").as_uri()),
            "degradation_policy": DegradationPolicy(),
        },
    )
    return live_performance_sensor(context)


def test_an_undisturbed_version_passes_its_checks_and_nothing_is_requested(platform, served, tmp_path, instance):
    land_outcomes(platform, served["readmitted"])

    run = measure(platform, served, tmp_path, instance)

    checks = {e.check_name: e for e in run.get_asset_check_evaluations()}
    assert checks[DISCRIMINATION].passed and checks[CALIBRATION].passed, {k: c.description for k, c in checks.items()}
    assert "within reach of its test ROC-AUC 0.750" in checks[DISCRIMINATION].description
    stored = platform.warehouse.query(f"SELECT metric, estimate, test, outcomes FROM {LIVE} WHERE model_version = '3'")
    assert stored.filter(pl.col("metric") == "roc_auc")["test"][0] == 0.75
    assert stored["outcomes"].unique().to_list() == [SERVED]
    metadata = run.asset_materializations_for_node(LIVE)[0].metadata
    assert metadata["serving_version"].value == "3" and metadata["over_time"].value.startswith("![live figures over time](data:image/png;base64,")
    assert platform.warehouse.query(f"SELECT count(*) AS n FROM {LIVE}_by_day")["n"][0] >= 1
    assert act(platform, tmp_path, instance).run_requests == []


def test_a_planted_degradation_fails_the_checks_and_requests_one_retrain(platform, served, tmp_path, instance):
    flipped = np.random.default_rng(11).random(SERVED) < 0.3
    land_outcomes(platform, served["readmitted"] ^ flipped)

    run = measure(platform, served, tmp_path, instance)

    checks = {e.check_name: e for e in run.get_asset_check_evaluations()}
    assert not checks[DISCRIMINATION].passed and checks[DISCRIMINATION].severity == dg.AssetCheckSeverity.ERROR
    assert "v3's live ROC-AUC" in checks[DISCRIMINATION].description
    assert "below its test ROC-AUC 0.750 by more than the interval allows" in checks[DISCRIMINATION].description
    assert not checks[CALIBRATION].passed
    acted = act(platform, tmp_path, instance)
    assert [(r.job_name, r.tags.get("readmission/trigger")) for r in acted.run_requests] == [("retrain", "live_performance")]
    rows = platform.warehouse.query("SELECT action, production_version, reason FROM promotion_decisions WHERE action = $1", [RETRAIN_REQUESTED])
    assert rows.height == 1 and rows["production_version"][0] == "3"
    assert rows["reason"][0].startswith("Live performance of production v3 fell short; retrain requested: v3's live ROC-AUC")
    assert act(platform, tmp_path, instance, acted.cursor).run_requests == []  # the same evaluation acts once


@pytest.mark.parametrize("auto_rollback", [False, True])
def test_a_version_clearly_worse_live_than_the_one_it_replaced_is_proposed_for_rollback(platform, tmp_path, instance, auto_rollback):
    from readmission_platform.lib.registry import ModelRegistry
    from readmission_platform.settings import Settings
    from readmission_platform_tests.cli.test_main import register_two_promoted_versions

    register_two_promoted_versions(tmp_path)  # v2 in production, having replaced v1
    settings = Settings.from_env({"READMISSION_HOME": str(tmp_path)})
    rng = np.random.default_rng(5)
    url = f"sqlite:///{tmp_path / 'predictions.sqlite'}"
    encounter = {name: SMOKE_ENCOUNTERS[0].get(name) for name in FIELDS}
    readmitted = []
    for version, flip in (("1", 0.0), ("2", 0.35)):  # v2 served last: it is the serving version
        probability = rng.beta(1.2, 9, SERVED)
        readmitted.append((rng.random(SERVED) < probability) ^ (rng.random(SERVED) < flip))
        write_predictions(url, (
            {"request_id": f"v{version}-{i}", "endpoint": "predict", "model_name": "readmission-classifier", "model_version": version,
             "probability": float(p), "decision": bool(p >= 0.15), "risk_band": "low", "inputs": encounter}
            for i, p in enumerate(probability)
        ))  # fmt: skip
    now = datetime.now(UTC)
    rows = pl.DataFrame({
        "batch_id": "outcomes_0001", "request_id": [f"v{v}-{i}" for v in ("1", "2") for i in range(SERVED)],
        "readmitted_30d": np.concatenate(readmitted), "known_at": now, "source_file": "outcomes_0001.csv",
        "line_number": range(2, 2 * SERVED + 2), "ingested_at": now,
    }).cast(OUTCOME_SCHEMA)  # fmt: skip
    platform.warehouse.replace_batch({OUTCOMES: (OUTCOME_SCHEMA, rows)}, "outcomes_0001")
    mlflow = MlflowResource(tracking_uri=settings.mlflow_tracking_uri, artifact_root=settings.mlflow_artifact_root.as_uri())
    resources = platform.resources | {"prediction_log": PredictionLogResource(url=url), "mlflow": mlflow}

    measured = dg.materialize([live_performance], resources=resources, instance=instance)
    metadata = measured.asset_materializations_for_node(LIVE)[0].metadata
    assert metadata["serving_version"].value == "2" and metadata["replaced_version"].value == "1"
    assert metadata["clearly_worse_than_replaced"].value.startswith("live ROC-AUC 0.")

    context = dg.build_sensor_context(
        instance=instance,
        resources={"warehouse": platform.resources["warehouse"], "mlflow": mlflow, "degradation_policy": DegradationPolicy(auto_rollback=auto_rollback)},
    )
    live_performance_sensor(context)
    rows = platform.warehouse.query("SELECT action, champion_version, production_version, reason FROM promotion_decisions ORDER BY action")
    registry = ModelRegistry(settings.mlflow_tracking_uri, settings.mlflow_artifact_root.as_uri())
    if auto_rollback:
        assert ("rolled_back", "2", "1") in [r[:3] for r in rows.rows()]
        assert str(registry.production().version) == "1"
    else:
        (proposed,) = [r for r in rows.iter_rows(named=True) if r["action"] == "rollback_proposed"]
        assert proposed["production_version"] == "2" and proposed["champion_version"] == "1"
        assert proposed["reason"].startswith("Rollback of production v2 to v1 proposed: live ROC-AUC")
        assert "readmission rollback" in proposed["reason"]
        assert str(registry.production().version) == "2"


def test_a_measurement_that_failed_before_its_checks_ran_leaves_the_sensor_working(platform, served, tmp_path, instance):
    flipped = np.random.default_rng(11).random(SERVED) < 0.3
    land_outcomes(platform, served["readmitted"] ^ flipped)
    measure(platform, served, tmp_path, instance)
    broken = {**served, "url": f"sqlite:///{tmp_path}"}  # a folder: the log cannot be read

    failed = measure(platform, broken, tmp_path, instance, raise_on_error=False)

    assert not failed.success  # its checks were planned and never evaluated: the newest record of each is a plan
    acted = act(platform, tmp_path, instance)
    assert [(r.job_name, r.tags.get("readmission/trigger")) for r in acted.run_requests] == [("retrain", "live_performance")]
    assert act(platform, tmp_path, instance, acted.cursor).run_requests == []
