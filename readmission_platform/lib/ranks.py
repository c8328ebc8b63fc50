"""ROC-AUC and average precision of one score under many weightings at once (the resamples of a bootstrap), in array
operations: what every ROC-AUC and PR-AUC the platform reports is computed by (`metrics`, `paired`'s bootstrap; DeLong's
test, which needs each row's placement, ranks its own), equal to scikit-learn's, ties and weights included
(lib/test_metrics.py holds them equal).

Its own module, with numpy alone, so that what compares versions (`paired`, the promotion, the command line) does not
import scikit-learn's metrics with it.
"""

from __future__ import annotations

import numpy as np


def tie_starts(sorted_scores: np.ndarray) -> np.ndarray:
    """The first position of each run of equal values in `sorted_scores`."""
    return np.flatnonzero(np.r_[True, sorted_scores[1:] != sorted_scores[:-1]])


def tied_weights(y_sorted: np.ndarray, starts: np.ndarray, weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The weight of readmitted and of other rows at each distinct score, under each row of `weight` (resamples × rows,
    the rows in rising order of the score, as `y_sorted`, with `starts` = `tie_starts` of the sorted scores)."""
    positive, negative = weight * y_sorted, weight * (1 - y_sorted)
    if len(starts) == weight.shape[1]:
        return positive, negative
    return np.add.reduceat(positive, starts, axis=1), np.add.reduceat(negative, starts, axis=1)


def roc_auc_of(tied_positive: np.ndarray, tied_negative: np.ndarray) -> np.ndarray:
    """ROC-AUC of each row of `tied_weights`: a readmission outranks every other row of a lower score and half of
    those of its own, as scikit-learn counts ties; NaN for a row without both classes."""
    below = np.cumsum(tied_negative, axis=1) - tied_negative / 2
    with np.errstate(divide="ignore", invalid="ignore"):
        return (tied_positive * below).sum(axis=1) / (tied_positive.sum(axis=1) * tied_negative.sum(axis=1))


def average_precision_of(tied_positive: np.ndarray, tied_negative: np.ndarray) -> np.ndarray:
    """Average precision (scikit-learn's, not interpolated) of each row of `tied_weights`: from the highest score down,
    each cut adds its readmissions times its precision; NaN for a row without readmissions."""
    true, false = np.cumsum(tied_positive[:, ::-1], axis=1), np.cumsum(tied_negative[:, ::-1], axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        precision = np.divide(true, true + false, out=np.zeros_like(true), where=(true + false) > 0)
        return (tied_positive[:, ::-1] * precision).sum(axis=1) / tied_positive.sum(axis=1)
