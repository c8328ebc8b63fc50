"""rollout_sensor on a real Dagster instance, MLflow store, warehouse and SQLite prediction log with planted rows."""

from __future__ import annotations

import json

import dagster as dg
import numpy as np
import pandas as pd
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline

from readmission_platform.defs.promotion.sensors import ROLLOUT, rollout_sensor
from readmission_platform.defs.resources import PredictionLogResource, RolloutPolicyResource
from readmission_platform.lib.encounter import FIELDS
from readmission_platform.lib.registry import CANARY, SHADOW
from readmission_platform.serving.model import SMOKE_ENCOUNTERS
from readmission_platform.serving.prediction_log import write_predictions

THRESHOLD = 0.15
pytestmark = pytest.mark.parametrize("platform", ["duckdb"], indirect=True)


@pytest.fixture
def rollout(mlflow, tmp_path):
    """v1 in production and v2 in shadow (small real models: the sensor reads their tags, never scores with them)."""
    registry = mlflow.registry()
    frame = pd.DataFrame({"x": np.arange(40.0), "label": np.arange(40) % 2})
    model = Pipeline([("classifier", LogisticRegression())]).fit(frame[["x"]], frame["label"])
    versions = []
    for name in ("v1", "v2"):
        run_id = registry.log_candidate(model, params={}, metrics={}, tags={}, artifacts=None, input_example=frame[["x"]], run_name=name)
        versions.append(registry.register(run_id, threshold=THRESHOLD, tags={}))
    registry.promote(versions[0], reason="first model")
    registry.start_shadow(versions[1], reason="better with 95 % confidence")
    return registry


def plant(url: str, rows: int, *, stage: str, shift: float = 0.0, failing: int = 0, seed: int = 0, whole: bool = False) -> None:
    """`rows` requests written as the log writer writes them: v2 scoring beside production v1 (shadow), or answering
    (canary: every other request, or every one when `whole`)."""
    rng = np.random.default_rng(seed)
    encounter = {name: SMOKE_ENCOUNTERS[0].get(name) for name in FIELDS}
    production = rng.beta(1.2, 9, rows)
    candidate = np.clip(production + rng.normal(0, 0.01, rows) + shift, 0, 1)
    planted = []
    for i in range(rows):
        error = f"raised ValueError: planted {i}" if i < failing else None
        row = {"request_id": f"{stage}-{seed}-{i}", "endpoint": "predict", "model_name": "readmission-classifier",
               "risk_band": "low", "inputs": encounter, "candidate_error": error, "candidate_ms": 8.0}  # fmt: skip
        if stage == SHADOW:
            row |= {"model_version": "1", "probability": float(production[i]), "decision": bool(production[i] >= THRESHOLD),
                    "stage": "production", "shadow_version": "2",
                    "shadow_probability": None if error else float(candidate[i])}  # fmt: skip
        elif whole or i % 2:
            row |= {"model_version": "2", "probability": float(candidate[i]), "decision": bool(candidate[i] >= THRESHOLD), "stage": CANARY}
        else:
            row |= {"model_version": "1", "probability": float(production[i]), "decision": bool(production[i] >= THRESHOLD),
                    "stage": "production", "candidate_ms": None}  # fmt: skip
        planted.append(row)
    write_predictions(url, planted)


def tick(instance, platform, mlflow, url, steps=(0.5, 1.0), stage_seconds=0):
    context = dg.build_sensor_context(
        instance=instance,
        resources={
            "warehouse": platform.resources["warehouse"],
            "mlflow": mlflow,
            "prediction_log": PredictionLogResource(url=url),
            "rollout_policy": RolloutPolicyResource(steps=list(steps), stage_seconds=stage_seconds, min_requests=100),
        },
    )
    return rollout_sensor(context)


def decisions(platform):
    return platform.warehouse.query("SELECT * FROM promotion_decisions ORDER BY decided_at")


def test_a_candidate_that_raises_is_rolled_back(platform, instance, mlflow, rollout, tmp_path):
    url = f"sqlite:///{tmp_path / 'predictions.sqlite'}"
    plant(url, 30, stage=SHADOW, failing=5)

    result = tick(instance, platform, mlflow, url)

    assert rollout.rollout() is None and str(rollout.production().version) == "1"
    (row,) = decisions(platform).iter_rows(named=True)
    assert row["action"] == "rollout_rolled_back" and row["candidate_version"] == "2" and row["rollout_stage"] is None
    assert "v2 rolled back from shadow: it failed 5 of 30 requests" in row["reason"]
    assert json.loads(row["signals"])["errors"] == 5
    (event,) = result.asset_events
    assert event.asset_key == dg.AssetKey(ROLLOUT) and event.metadata["action"].value == "rollout_rolled_back"
    assert rollout.version("2").tags["rollout_end_reason"] == row["reason"]


def test_a_candidate_whose_scores_shifted_is_rolled_back(platform, instance, mlflow, rollout, tmp_path):
    url = f"sqlite:///{tmp_path / 'predictions.sqlite'}"
    plant(url, 150, stage=SHADOW, shift=0.2)

    tick(instance, platform, mlflow, url)

    assert rollout.rollout() is None and str(rollout.production().version) == "1"
    (row,) = decisions(platform).iter_rows(named=True)
    assert row["action"] == "rollout_rolled_back" and "PSI" in row["reason"] and "agrees with production on" in row["reason"]
    assert json.loads(row["signals"])["psi"] > 0.25


def test_a_healthy_candidate_advances_step_by_step_to_production(platform, instance, mlflow, rollout, tmp_path):
    url = f"sqlite:///{tmp_path / 'predictions.sqlite'}"
    plant(url, 60, stage=SHADOW)
    waiting = tick(instance, platform, mlflow, url)
    assert isinstance(waiting, dg.SkipReason) and "60 of 100 requests" in waiting.skip_message
    assert rollout.rollout().stage == SHADOW

    plant(url, 60, stage=SHADOW, seed=1)
    advanced = tick(instance, platform, mlflow, url)
    assert (rollout.rollout().stage, rollout.rollout().share) == (CANARY, 0.5)
    assert advanced.asset_events[0].metadata["to_stage"].value == CANARY

    # Rows from before the step do not count for the next one.
    assert isinstance(tick(instance, platform, mlflow, url), dg.SkipReason)
    plant(url, 220, stage=CANARY, seed=2)
    tick(instance, platform, mlflow, url)
    assert (rollout.rollout().stage, rollout.rollout().share) == (CANARY, 1.0)
    plant(url, 220, stage=CANARY, seed=3)
    tick(instance, platform, mlflow, url)

    assert rollout.rollout() is None and str(rollout.production().version) == "2"
    rows = decisions(platform)
    assert rows["action"].to_list() == ["rollout_advanced"] * 3
    assert rows["rollout_stage"].to_list() == [CANARY, CANARY, "production"]
    assert rows["rollout_share"].to_list() == [0.5, 1.0, None]
    assert rows["production_version"].to_list() == ["1", "1", "2"]
    assert rollout.version("2").tags["previous_production"] == "1"


def test_a_whole_canary_is_compared_with_production_s_answers_from_before_its_step(platform, instance, mlflow, rollout, tmp_path):
    url = f"sqlite:///{tmp_path / 'predictions.sqlite'}"
    plant(url, 120, stage=SHADOW)
    tick(instance, platform, mlflow, url)
    plant(url, 240, stage=CANARY, seed=1)
    tick(instance, platform, mlflow, url)
    assert (rollout.rollout().stage, rollout.rollout().share) == (CANARY, 1.0)

    # At the whole share production answers nothing in the step; its answers of the hour before (the shadowed
    # encounters and its half of the first step) are the comparison.
    plant(url, 150, stage=CANARY, seed=2, shift=0.3, whole=True)
    result = tick(instance, platform, mlflow, url, stage_seconds=3600)

    assert rollout.rollout() is None and str(rollout.production().version) == "1"
    row = decisions(platform).row(-1, named=True)
    assert row["action"] == "rollout_rolled_back" and "v2 rolled back from canary at 100%" in row["reason"]
    signals = json.loads(row["signals"])
    assert signals["psi"] > 0.25 and signals["reference"] == 240 and signals["requests"] == 150
    assert result.asset_events[0].metadata["psi_reference"].value == 240


def test_nothing_in_rollout_is_skipped(platform, instance, mlflow, tmp_path):
    result = tick(instance, platform, mlflow, f"sqlite:///{tmp_path / 'predictions.sqlite'}")
    assert isinstance(result, dg.SkipReason) and result.skip_message == "no candidate in shadow or canary"
