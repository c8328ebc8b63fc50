"""Two models scored on the same patients, compared once: DeLong's test of their ROC-AUCs and a paired bootstrap over
patients of the ROC-AUC and Brier differences, each with its interval and p-value.

Every comparison of two versions (the promotion decision, reports) calls these functions; nothing else computes a
paired difference. Differences are always `a - b`: with `a` the challenger, a positive ROC-AUC difference and a
negative Brier difference favour it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.stats import norm, rankdata

from readmission_platform.lib.ranks import roc_auc_of, tie_starts, tied_weights

PAIRED_METRICS = ("roc_auc", "brier")


@dataclass(frozen=True)
class DeLong:
    """DeLong's test (DeLong, DeLong & Clarke-Pearson 1988) of two correlated ROC-AUCs, computed as Sun & Xu (2014)."""

    auc_a: float
    auc_b: float
    difference: float
    standard_error: float
    z: float
    p_value: float
    lower: float
    upper: float


@dataclass(frozen=True)
class PairedDifference:
    """`metric` of model a and of model b, their difference a - b, its percentile interval and two-sided p-value."""

    metric: str
    a: float
    b: float
    difference: float
    lower: float
    upper: float
    p_value: float


@dataclass(frozen=True)
class PairedComparison:
    """Everything a promotion decision states about challenger (a) against production (b) on the same test rows."""

    roc_auc: PairedDifference
    brier: PairedDifference
    delong: DeLong
    rows: int
    patients: int
    resamples: int
    level: float

    @property
    def method(self) -> str:
        return (
            f"paired bootstrap over {self.patients:,} test patients ({self.rows:,} encounters, {self.resamples:,} "
            f"resamples, {self.level:.0%} percentile intervals); DeLong's test beside it"
        )


def _checked(y_true, score_a, score_b) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    y = np.asarray(y_true)
    a, b = np.asarray(score_a, dtype=float), np.asarray(score_b, dtype=float)
    if y.ndim != 1 or a.shape != y.shape or b.shape != y.shape:
        raise ValueError(f"y_true {y.shape}, score_a {a.shape} and score_b {b.shape} must be one score of each model per label")
    if not np.isin(y, (0, 1)).all():
        raise ValueError(f"y_true holds {sorted(set(np.unique(y).tolist()) - {0, 1})[:5]}; expected 0/1 labels")
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise ValueError("the scores hold NaN or infinite values; expected a finite score for every row")
    y = y.astype(bool)
    if y.all() or not y.any():
        raise ValueError("a paired ROC comparison needs rows of both classes; y_true holds only one")
    return y, a, b


def delong(y_true, score_a, score_b, *, level: float = 0.95) -> DeLong:
    """DeLong's test that two scores of the same rows have equal ROC-AUC: the difference a - b, its standard error, z,
    the two-sided p-value and the `level` interval. Rows are taken as independent (one per patient)."""
    y, a, b = _checked(y_true, score_a, score_b)
    scores = np.vstack([a, b])
    positives, negatives = scores[:, y], scores[:, ~y]
    m, n = positives.shape[1], negatives.shape[1]
    # Sun & Xu's midrank form: each row's placement value from three rankings instead of an m × n comparison.
    ranked = rankdata(np.hstack([positives, negatives]), axis=1)
    within_positive, within_negative = rankdata(positives, axis=1), rankdata(negatives, axis=1)
    auc = (ranked[:, :m].sum(axis=1) / m - (m + 1) / 2) / n
    v10 = (ranked[:, :m] - within_positive) / n
    v01 = 1 - (ranked[:, m:] - within_negative) / m
    covariance = np.atleast_2d(np.cov(v10)) / m + np.atleast_2d(np.cov(v01)) / n
    variance = max(covariance[0, 0] + covariance[1, 1] - 2 * covariance[0, 1], 0.0)
    difference = float(auc[0] - auc[1])
    se = float(np.sqrt(variance))
    if se == 0.0:
        # Identical rankings: no difference and no uncertainty about it.
        z, p = 0.0, 1.0
    else:
        z = difference / se
        p = float(2 * norm.sf(abs(z)))
    half = float(norm.ppf((1 + level) / 2)) * se
    return DeLong(float(auc[0]), float(auc[1]), difference, se, float(z), p, difference - half, difference + half)


def _p_value(draws: np.ndarray) -> float:
    """Two-sided bootstrap p-value of 'no difference': twice the smaller share of draws on either side of 0, each
    counted with the observed sample (+1) so that it is never 0."""
    below, above = (draws <= 0).sum(), (draws >= 0).sum()
    return float(min(1.0, 2 * (min(below, above) + 1) / (len(draws) + 1)))


def paired_bootstrap(
    patients, y_true, score_a, score_b, *, resamples: int = 1000, level: float = 0.95, seed: int = 0, chunk: int = 100
) -> dict[str, PairedDifference]:
    """ROC-AUC and Brier of a and b and their differences a - b, with percentile intervals and p-values from resampling
    patients (with all their encounters); both models see the same resample, so their correlation is kept."""
    y, a, b = _checked(y_true, score_a, score_b)
    if resamples < 1:
        raise ValueError(f"resamples is {resamples}; expected at least 1")
    _, patient_index = np.unique(np.asarray(patients), return_inverse=True)
    if len(patient_index) != len(y):
        raise ValueError(f"patients has {len(patient_index)} values and y_true {len(y)}; expected one id per row")
    count = int(patient_index.max()) + 1
    # Each score's rows in rising order, with their labels, first rows of ties and patients in that order.
    orders = [np.argsort(s, kind="stable") for s in (a, b)]
    ranked = [(y[o].astype(float), tie_starts(s[o]), patient_index[o]) for s, o in zip((a, b), orders, strict=True)]
    # Brier by patient: a resample's Brier is its patients' squared errors over their encounters, weighted by draws.
    squared = np.stack([np.bincount(patient_index, (s - y) ** 2, minlength=count) for s in (a, b)], axis=1)
    encounters = np.bincount(patient_index, minlength=count).astype(float)
    rng = np.random.default_rng(seed)
    differences = {name: [] for name in PAIRED_METRICS}
    done = 0
    while done < resamples:
        size = min(chunk, resamples - done)
        drawn = rng.integers(0, count, (size, count)) + (np.arange(size) * count)[:, None]
        # A patient drawn k times enters with weight k: the same as repeating their encounters k times.
        draws = np.bincount(drawn.ravel(), minlength=size * count).reshape(size, count).astype(float)
        auc_a, auc_b = (roc_auc_of(*tied_weights(labels, starts, draws[:, patients_sorted])) for labels, starts, patients_sorted in ranked)
        brier = (draws @ squared) / (draws @ encounters)[:, None]
        differences["roc_auc"].append(auc_a - auc_b)
        differences["brier"].append(brier[:, 0] - brier[:, 1])
        done += size
    ones = np.ones((1, len(y)))
    estimates = {
        "roc_auc": [float(roc_auc_of(*tied_weights(labels, starts, ones))[0]) for labels, starts, _ in ranked],
        "brier": [float(((s - y) ** 2).mean()) for s in (a, b)],
    }
    tail = (1 - level) / 2 * 100
    found = {}
    for name in PAIRED_METRICS:
        draws = np.concatenate(differences[name])
        draws = draws[np.isfinite(draws)]  # a resample with one class only has no ROC-AUC
        lower, upper = np.percentile(draws, [tail, 100 - tail])
        first, second = estimates[name]
        found[name] = PairedDifference(name, first, second, first - second, float(lower), float(upper), _p_value(draws))
    return found


def compare(
    patients, y_true, score_a, score_b, *, resamples: int = 1000, level: float = 0.95, seed: int = 0
) -> PairedComparison:
    """The paired bootstrap and DeLong's test of challenger a against production b on the same rows."""
    boot = paired_bootstrap(patients, y_true, score_a, score_b, resamples=resamples, level=level, seed=seed)
    return PairedComparison(
        roc_auc=boot["roc_auc"],
        brier=boot["brier"],
        delong=delong(y_true, score_a, score_b, level=level),
        rows=len(np.asarray(y_true)),
        patients=len(np.unique(np.asarray(patients))),
        resamples=resamples,
        level=level,
    )
