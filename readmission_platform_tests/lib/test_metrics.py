import numpy as np
import polars as pl
import pytest
from sklearn.metrics import (
    average_precision_score,
    brier_score_loss,
    f1_score,
    log_loss,
    precision_score,
    recall_score,
    roc_auc_score,
)

from readmission_platform.lib.metrics import (
    base_rate_brier,
    bootstrap_intervals,
    calibration_table,
    choose_threshold,
    average_precision_of,
    evaluate,
    ranking,
    subgroup_report,
    threshold_metrics,
)
from readmission_platform.lib.ranks import average_precision_of, roc_auc_of, tie_starts, tied_weights

# By hand: flagging p >= 0.35 catches all three positives with one false alarm, F1 = 6/7;
# every other cut does worse (0.1: 2/3, 0.3: 3/4, 0.6: 2/3, 0.7: 4/5, 0.9: 1/2).
HAND_Y = [0, 0, 1, 0, 1, 1]
HAND_P = [0.1, 0.3, 0.35, 0.6, 0.7, 0.9]


def synthetic(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Probabilities around a 12 % rate and labels drawn from them: a calibrated, weakly informative model."""
    rng = np.random.default_rng(seed)
    probability = rng.beta(1.2, 9.0, n)
    return (rng.random(n) < probability).astype(int), probability


def test_evaluate_agrees_with_scikit_learn():
    y, p = synthetic(5_000)
    result = evaluate(y, p, threshold=0.2, prevalence=0.1)

    assert result["roc_auc"] == pytest.approx(roc_auc_score(y, p))
    assert result["pr_auc"] == pytest.approx(average_precision_score(y, p))
    assert result["brier"] == pytest.approx(brier_score_loss(y, p))
    assert result["log_loss"] == pytest.approx(log_loss(y, p))
    assert result["base_rate_brier"] == pytest.approx(brier_score_loss(y, np.full(len(y), 0.1)))
    assert result["precision"] == pytest.approx(precision_score(y, p >= 0.2))
    assert result["recall"] == pytest.approx(recall_score(y, p >= 0.2))
    assert result["f1"] == pytest.approx(f1_score(y, p >= 0.2))
    assert result["positive_rate"] == pytest.approx(np.mean(p >= 0.2))
    assert (result["rows"], result["positives"]) == (5_000, y.sum())
    assert 0.6 < result["roc_auc"] < 0.8


def test_labels_may_be_booleans_and_ranking_matches_evaluate():
    y, p = synthetic(1_000)

    assert ranking(y.astype(bool), p) == {
        "roc_auc": pytest.approx(roc_auc_score(y, p)),
        "pr_auc": pytest.approx(average_precision_score(y, p)),
    }


def test_ranking_and_weighted_resamples_are_scikit_learn_s_scores_ties_and_left_out_rows_included():
    rng = np.random.default_rng(5)
    p = np.round(rng.beta(1.2, 9.0, 3_000), 2)  # rounded: many rows share a probability
    y = (rng.random(len(p)) < p).astype(int)
    assert ranking(y, p) == {
        "roc_auc": pytest.approx(roc_auc_score(y, p), rel=1e-12),
        "pr_auc": pytest.approx(average_precision_score(y, p), rel=1e-12),
    }
    weight = rng.poisson(1.0, (4, len(p))).astype(float)  # a resample's draws; 0 leaves a row out
    order = np.argsort(p, kind="stable")
    tied = tied_weights(y[order].astype(float), tie_starts(p[order]), weight[:, order])
    for roc_auc, pr_auc, w in zip(roc_auc_of(*tied), average_precision_of(*tied), weight, strict=True):
        drawn = w > 0
        assert roc_auc == pytest.approx(roc_auc_score(y[drawn], p[drawn], sample_weight=w[drawn]), rel=1e-12)
        assert pr_auc == pytest.approx(average_precision_score(y[drawn], p[drawn], sample_weight=w[drawn]), rel=1e-12)


def test_base_rate_brier_is_the_brier_of_a_constant_prediction():
    assert base_rate_brier([0, 0, 0, 1], 0.25) == pytest.approx(brier_score_loss([0, 0, 0, 1], [0.25] * 4))
    assert base_rate_brier([0, 0, 0, 1], 0.25) == pytest.approx((3 * 0.25**2 + 0.75**2) / 4)


def test_threshold_choice_maximises_f1_on_a_hand_checked_example():
    threshold = choose_threshold(HAND_Y, HAND_P)

    assert threshold == 0.35
    assert threshold_metrics(HAND_Y, HAND_P, threshold) == {
        "threshold": 0.35,
        "precision": pytest.approx(0.75),
        "recall": pytest.approx(1.0),
        "f1": pytest.approx(6 / 7),
        "positive_rate": pytest.approx(4 / 6),
    }
    assert max(threshold_metrics(HAND_Y, HAND_P, t)["f1"] for t in HAND_P) == pytest.approx(6 / 7)


def test_threshold_choice_is_the_best_cut_on_larger_data():
    y, p = synthetic(2_000)
    threshold = choose_threshold(y, p)
    best = threshold_metrics(y, p, threshold)["f1"]

    assert all(threshold_metrics(y, p, t)["f1"] <= best + 1e-12 for t in np.unique(p)[::20])


def test_calibration_table_ranks_rows_into_equal_deciles():
    y, p = synthetic(1_000)
    order = np.argsort(p)
    table = calibration_table(y, p)

    assert table["rows"].to_list() == [100] * 10
    assert table["mean_predicted"].to_numpy() == pytest.approx(p[order].reshape(10, 100).mean(axis=1))
    assert table["observed_rate"].to_numpy() == pytest.approx(y[order].reshape(10, 100).mean(axis=1))
    assert table["mean_predicted"].is_sorted()


def test_subgroup_report_scores_each_group_and_leaves_one_class_groups_without_auc():
    y, p = synthetic(3_000)
    groups = np.where(np.arange(3_000) < 2_000, "Female", "Male")
    y[2_000:] = 0
    report = subgroup_report(pl.Series("gender", groups), y, p, threshold=0.2)
    female, male = (report.row(i, named=True) for i in range(2))

    assert (female["group"], female["rows"], female["positives"]) == ("Female", 2_000, y[:2_000].sum())
    assert female["roc_auc"] == pytest.approx(roc_auc_score(y[:2_000], p[:2_000]))
    assert female["brier"] == pytest.approx(brier_score_loss(y[:2_000], p[:2_000]))
    assert female["positive_rate"] == pytest.approx(np.mean(p[:2_000] >= 0.2))
    assert female["mean_predicted"] == pytest.approx(p[:2_000].mean())
    assert (male["group"], male["positives"], male["roc_auc"]) == ("Male", 0, None)
    assert male["brier"] == pytest.approx(np.mean(p[2_000:] ** 2))


def test_bootstrap_interval_holds_the_estimate_and_shrinks_with_more_patients():
    widths = {}
    for n in (1_000, 20_000):
        y, p = synthetic(n)
        intervals = bootstrap_intervals(np.arange(n), y, p, resamples=200, seed=1)
        for metric, estimate, lower, upper in intervals.iter_rows():
            assert lower < estimate < upper, (n, metric)
        widths[n] = dict(zip(intervals["metric"], intervals["upper"] - intervals["lower"], strict=True))
        assert intervals.row(0) == pytest.approx(("roc_auc", roc_auc_score(y, p), *intervals.row(0)[2:]))

    for metric in ("roc_auc", "pr_auc", "brier"):
        assert widths[20_000][metric] < 0.5 * widths[1_000][metric], metric


def test_bootstrap_resamples_patients_not_encounters():
    # 100 patients with 20 identical encounters each carry the information of 100 rows, not 2,000.
    y, p = synthetic(100)
    repeated_y, repeated_p = np.tile(y, 20), np.tile(p, 20)
    per_patient = bootstrap_intervals(np.tile(np.arange(100), 20), repeated_y, repeated_p, seed=1)
    per_encounter = bootstrap_intervals(np.arange(2_000), repeated_y, repeated_p, seed=1)

    width = (per_patient["upper"] - per_patient["lower"]) / (per_encounter["upper"] - per_encounter["lower"])
    assert (width > 3).all(), width


def test_bootstrap_is_reproducible_by_seed():
    y, p = synthetic(2_000)
    patients = np.arange(2_000) // 2

    first, again, other = (bootstrap_intervals(patients, y, p, resamples=50, seed=seed) for seed in (3, 3, 4))

    assert first.equals(again)
    assert not first.equals(other)


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match=r"y_true holds \[2\]"):
        evaluate([0, 1, 2], [0.1, 0.2, 0.3], threshold=0.5, prevalence=0.1)
    with pytest.raises(ValueError, match=r"outside \[0, 1\]"):
        evaluate([0, 1], [0.1, 1.2], threshold=0.5, prevalence=0.1)
    with pytest.raises(ValueError, match="one probability per label"):
        evaluate([0, 1], [0.1], threshold=0.5, prevalence=0.1)
    with pytest.raises(ValueError, match="both classes"):
        evaluate([0, 0], [0.1, 0.2], threshold=0.5, prevalence=0.1)
