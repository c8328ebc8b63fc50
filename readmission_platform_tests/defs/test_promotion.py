"""promotion_decision on the evidence: real trained models compared on the same real test patients."""

from __future__ import annotations

from types import SimpleNamespace

import dagster as dg
import polars as pl
import pytest

from readmission_platform.defs.promotion.assets import challenger_version, promotion_decision
from readmission_platform.defs.training.assets import trained_model
from readmission_platform.lib.registry import ROLLOUT_END_REASON, SHADOW
from readmission_platform.lib.training import model_input, train_candidates
from readmission_platform_tests.defs.conftest import FAST, ingest, metadata, retrain


def decide_again(instance, resources) -> dg.ExecuteInProcessResult:
    """promotion_decision alone, on the latest trained_model."""
    return dg.materialize([promotion_decision, trained_model], selection=[promotion_decision], resources=resources, instance=instance)


def weak_production(platform, mlflow) -> str:
    """A real logistic regression fitted on 150 training rows, registered and put in production; its version."""
    with platform.warehouse as store:
        frame = store.read_table("training_set")
    train, validation = frame.filter(frame["split"] == "train"), frame.filter(frame["split"] == "validation")
    (candidate,) = train_candidates(train.head(150), validation.head(400), families=("logistic_regression",))
    registry = mlflow.registry()
    run_id = registry.log_candidate(
        candidate.model, params={"family": "logistic_regression"}, metrics={}, tags={}, artifacts=None,
        input_example=model_input(train.head(5)), run_name="weak",
    )  # fmt: skip
    version = registry.register(run_id, threshold=candidate.threshold, tags={})
    registry.promote(version, reason="a weak model in production, for the test")
    return version


@pytest.mark.parametrize("platform", ["duckdb"], indirect=True)
def test_a_challenger_within_noise_stays_out_and_a_clearly_better_one_goes_to_shadow(
    platform, instance, resources, mlflow, training_batches
):
    for i, data in enumerate(training_batches[:3], start=1):
        ingest(platform, instance, resources, data, f"batch_{i:04d}")
    first_run = retrain(instance, resources)
    first = metadata(first_run, "promotion_decision")
    assert first["rollout_stage"] == "production" and first["comparison"] == "no production model to compare with"

    # v2: the same family on one more batch, judged against v1 on the same test patients, on ROC-AUC alone (no
    # non-inferiority margin: a better calibration cannot carry it).
    ingest(platform, instance, resources, training_batches[3], "batch_0004")
    auc_alone = {"ops": FAST["ops"] | {"promotion_decision": {"config": {"non_inferiority_margin": 0.0}}}}
    noise = metadata(retrain(instance, resources, run_config=auc_alone), "promotion_decision")
    assert noise["challenger_version"] == "2" and noise["promoted"] is False, noise["reason"]
    assert noise["roc_auc_difference_lower"] < 0 < noise["roc_auc_difference_upper"]
    assert noise["roc_auc_p_value"] > 0.05 and "neither better than production v1 with 95% confidence" in noise["reason"]
    assert noise["rollout_stage"] == "not promoted" and str(mlflow.registry().production().version) == "1"
    assert mlflow.registry().rollout() is None

    weak = weak_production(platform, mlflow)
    # A candidate already in rollout (the weak model registered again) gives way to the better challenger.
    registry = mlflow.registry()
    in_rollout = registry.register(registry.version(weak).run_id, threshold=0.5, tags={})
    registry.start_shadow(in_rollout, reason="a candidate in rollout, for the test")
    better_run = decide_again(instance, resources)
    better = metadata(better_run, "promotion_decision")
    assert better["promoted"] is True and better["rollout_stage"] == SHADOW, better["reason"]
    assert better["roc_auc_difference_lower"] > 0 and better["roc_auc_p_value"] < 0.01 and better["delong_p_value"] < 0.01
    assert f"better than production v{weak} with 95% confidence" in better["reason"]
    registry = mlflow.registry()
    assert str(registry.production().version) == weak  # production keeps answering until the rollout ends
    rollout = registry.rollout()
    assert (rollout.version, rollout.stage, rollout.share) == ("2", SHADOW, 0.0)
    tags = registry.version("2").tags
    assert tags["promotion.decision"] == "shadow"
    assert float(tags["promotion.roc_auc_difference"]) == pytest.approx(better["roc_auc_difference"])
    # How the two score the same test patients, kept for the rollout to judge the candidate's live scores by.
    from readmission_platform.lib.registry import decision_threshold
    from readmission_platform.lib.rollout import Foreseen, foresee
    from readmission_platform.lib.training import predict_probability

    with platform.warehouse as store:
        test = store.read_table("training_set").filter(pl.col("split") == "test")
    scores = {v: predict_probability(registry.load_model(v), test) for v in ("2", weak)}
    foreseen = foresee(scores["2"], decision_threshold(registry.version("2")), scores[weak], decision_threshold(registry.version(weak)))
    assert Foreseen.from_tags(tags) == Foreseen(round(foreseen.agreement, 4), round(foreseen.psi, 4))
    assert 0 < foreseen.agreement < 1 and foreseen.psi > 0

    assert registry.version(in_rollout).tags[ROLLOUT_END_REASON].startswith("replaced by v2: ")

    rows = platform.warehouse.query("SELECT * FROM promotion_decisions ORDER BY decided_at")
    assert rows["promoted"].to_list() == [True, False, True, None]
    assert rows["rollout_stage"].to_list() == ["production", None, SHADOW, None]
    assert rows["candidate_version"].to_list() == [None, None, "2", in_rollout]
    assert rows["action"][3] == "rollout_aborted" and rows["production_version"][3] == weak
    assert rows["reason"][3] == f"v{in_rollout}'s rollout ends: replaced by v2, promoted on newer evidence"
    assert rows["roc_auc_difference"][2] == pytest.approx(better["roc_auc_difference"])
    assert rows["brier_difference_upper"][1] == pytest.approx(noise["brier_difference_upper"])
    assert rows["comparison"][0] is None and "paired bootstrap over" in rows["comparison"][2]

    # A retry of the first retrain, made after later ones trained, decides on the version its own run trained; a
    # decision run alone takes the newest.
    instance.report_runless_asset_event(dg.AssetMaterialization(trained_model.key, metadata={"model_version": "99"}))
    assert challenger_version(SimpleNamespace(instance=instance, run=first_run.dagster_run)) == "1"
    assert challenger_version(SimpleNamespace(instance=instance, run=better_run.dagster_run)) == "99"
