"""Paired statistics against a published worked example, a direct O(m·n) DeLong, scikit-learn, and their properties."""

import numpy as np
import pytest
from scipy.stats import norm
from sklearn.metrics import roc_auc_score

from readmission_platform.lib.paired import compare, delong, paired_bootstrap

# Hanley & McNeil (1982), Radiology 143:29, Table 1: 109 CT images rated 1 (definitely normal) … 5 (definitely
# abnormal) — 58 normal, 51 abnormal. The paper's area under the rating ROC curve is 0.893.
NORMAL_COUNTS, ABNORMAL_COUNTS = (33, 6, 6, 11, 2), (3, 2, 2, 11, 33)


def ratings() -> tuple[np.ndarray, np.ndarray]:
    normal = np.repeat(np.arange(1, 6), NORMAL_COUNTS)
    abnormal = np.repeat(np.arange(1, 6), ABNORMAL_COUNTS)
    return np.r_[np.zeros(len(normal)), np.ones(len(abnormal))], np.r_[normal, abnormal].astype(float)


def direct_delong(y, a, b):
    """DeLong et al. (1988) as written: placement values from every positive-negative pair, then their covariances."""
    y = y.astype(bool)

    def psi(x, z):
        return (x > z) + 0.5 * (x == z)

    v10, v01 = [], []
    for s in (a, b):
        pairs = psi(s[y][:, None], s[~y][None, :])
        v10.append(pairs.mean(axis=1))
        v01.append(pairs.mean(axis=0))
    m, n = y.sum(), (~y).sum()
    s = np.cov(np.array(v10)) / m + np.cov(np.array(v01)) / n
    auc = [v.mean() for v in v10]
    return auc, np.sqrt(s[0, 0] + s[1, 1] - 2 * s[0, 1])


def two_models(rows=4_000, gap=0.0, seed=3):
    """Labels and two correlated scores sharing a signal; model a gets `gap` more of it."""
    rng = np.random.default_rng(seed)
    y = rng.random(rows) < 0.12
    shared = rng.normal(size=rows)
    a = shared + (0.7 + gap) * y + 0.6 * rng.normal(size=rows)
    b = shared + 0.7 * y + 0.6 * rng.normal(size=rows)
    to_p = lambda x: 1 / (1 + np.exp(-(x - 2)))  # noqa: E731 - a probability for the Brier score
    return y.astype(int), to_p(a), to_p(b)


def test_the_hanley_mcneil_ratings_give_the_published_area():
    y, rating = ratings()
    found = delong(y, rating, rating)
    assert round(found.auc_a, 3) == 0.893
    # Ties (many images share a rating) counted half, as scikit-learn does.
    assert found.auc_a == pytest.approx(roc_auc_score(y, rating), abs=1e-12)


def test_fast_delong_matches_the_direct_formula_with_ties():
    y, a, b = two_models(rows=1_500)
    a, b = np.round(a, 2), np.round(b, 2)  # many ties
    found = delong(y, a, b)
    (auc_a, auc_b), se = direct_delong(y, a, b)
    assert found.auc_a == pytest.approx(auc_a, abs=1e-12) and found.auc_b == pytest.approx(auc_b, abs=1e-12)
    assert found.auc_a == pytest.approx(roc_auc_score(y, a), abs=1e-12)
    assert found.standard_error == pytest.approx(se, rel=1e-9)
    assert found.p_value == pytest.approx(2 * norm.sf(abs(auc_a - auc_b) / se), rel=1e-9)
    assert found.lower == pytest.approx(found.difference - 1.959964 * se, rel=1e-6)


def test_identical_scores_differ_by_nothing_and_p_is_one():
    y, a, _ = two_models()
    patients = np.arange(len(y)) // 2
    same = compare(patients, y, a, a.copy(), resamples=200)
    for result in (same.roc_auc, same.brier):
        assert result.difference == 0 and result.lower == 0 and result.upper == 0 and result.p_value == 1
    assert same.delong.difference == 0 and same.delong.p_value == 1


def test_a_clearly_better_model_gets_a_tiny_p_and_an_interval_above_zero():
    y, a, b = two_models(gap=0.5)
    found = compare(np.arange(len(y)), y, a, b, resamples=500)
    assert found.roc_auc.difference == pytest.approx(roc_auc_score(y, a) - roc_auc_score(y, b), abs=1e-12)
    assert found.roc_auc.lower > 0 and found.roc_auc.p_value < 0.01
    assert found.delong.lower > 0 and found.delong.p_value < 0.001


def test_a_difference_within_noise_is_not_significant():
    y, a, b = two_models(gap=0.0, seed=5)
    found = compare(np.arange(len(y)), y, a, b, resamples=500)
    assert found.roc_auc.lower < 0 < found.roc_auc.upper and found.roc_auc.p_value > 0.05
    assert found.delong.lower < 0 < found.delong.upper and found.delong.p_value > 0.05


def test_with_one_encounter_per_patient_the_bootstrap_interval_agrees_with_delong():
    y, a, b = two_models(gap=0.15, seed=11)
    found = compare(np.arange(len(y)), y, a, b, resamples=1_000)
    boot_width = found.roc_auc.upper - found.roc_auc.lower
    delong_width = found.delong.upper - found.delong.lower
    assert boot_width == pytest.approx(delong_width, rel=0.15)


def test_patients_are_resampled_whole():
    y, a, b = two_models(rows=2_000, gap=0.2)
    patients = np.arange(len(y))
    once = paired_bootstrap(patients, y, a, b, resamples=300)
    # Every encounter twice under the same patient: a resample of patients draws both copies together, so every
    # resampled ROC-AUC and Brier (and so the intervals) stay as they were; resampling rows would narrow them.
    twice = paired_bootstrap(np.r_[patients, patients], np.r_[y, y], np.r_[a, a], np.r_[b, b], resamples=300)
    for name in ("roc_auc", "brier"):
        assert twice[name].difference == pytest.approx(once[name].difference, abs=1e-12)
        assert twice[name].lower == pytest.approx(once[name].lower, abs=1e-9)
        assert twice[name].upper == pytest.approx(once[name].upper, abs=1e-9)


def test_a_better_calibrated_model_has_a_negative_brier_difference():
    y, a, _ = two_models(gap=0.0, seed=2)
    overconfident = np.clip(a * 1.8, 0, 1)
    found = paired_bootstrap(np.arange(len(y)), y, a, overconfident, resamples=300)
    assert found["brier"].difference < 0 and found["brier"].upper < 0 and found["brier"].p_value < 0.01
    assert found["roc_auc"].difference == pytest.approx(0, abs=1e-3)  # the same ranking, bar clipped ties


@pytest.mark.parametrize(
    ("y", "a", "b", "message"),
    [
        ([0, 1, 1], [0.1, 0.2], [0.1, 0.2, 0.3], "one score of each model per label"),
        ([1, 1, 1], [0.1, 0.2, 0.3], [0.1, 0.2, 0.3], "rows of both classes"),
        ([0, 1, 2], [0.1, 0.2, 0.3], [0.1, 0.2, 0.3], "expected 0/1 labels"),
        ([0, 1, 1], [0.1, np.nan, 0.3], [0.1, 0.2, 0.3], "NaN or infinite"),
    ],
)
def test_bad_input_is_named(y, a, b, message):
    with pytest.raises(ValueError, match=message):
        delong(y, a, b)
    with pytest.raises(ValueError, match=message):
        paired_bootstrap([1, 2, 3], y, a, b, resamples=10)


def test_patients_must_match_the_rows():
    with pytest.raises(ValueError, match="one id per row"):
        paired_bootstrap([1, 2], [0, 1, 1], [0.1, 0.2, 0.3], [0.2, 0.1, 0.3], resamples=10)
