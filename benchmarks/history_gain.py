"""What point-in-time history adds: the same learner with and without `history.HISTORY_FEATURES`, on the platform's
patient-grouped split, test ROC-AUC with a paired bootstrap over test patients (both models scored on the same draws).

Run: `python benchmarks/history_gain.py [--family hist_gradient_boosting] [--resamples 500]` (about a minute).
"""

from __future__ import annotations

import argparse

import numpy as np
import polars as pl
from sklearn.metrics import roc_auc_score

from readmission_platform.lib import features, training
from readmission_platform.lib.cleaning import clean
from readmission_platform.lib.features import build_features
from readmission_platform.lib.history import HISTORY_FEATURES, with_history
from readmission_platform.lib.ingest import parse_batch
from readmission_platform.lib.source import read_source_bytes
from readmission_platform.lib.splitting import SPLIT, assign_split


def paired_auc_difference(patients, y, first, second, *, resamples: int, seed: int = 0) -> tuple[float, float, float]:
    """ROC-AUC of `second` minus that of `first`, and its percentile interval over patients drawn with replacement
    (a patient drawn k times weighs k), both scored on each draw."""
    _, index = np.unique(np.asarray(patients), return_inverse=True)
    count = index.max() + 1
    rng = np.random.default_rng(seed)
    draws = []
    for _ in range(resamples):
        weight = np.bincount(rng.integers(0, count, count), minlength=count)[index]
        drawn = weight > 0
        draws.append(
            roc_auc_score(y[drawn], second[drawn], sample_weight=weight[drawn])
            - roc_auc_score(y[drawn], first[drawn], sample_weight=weight[drawn])
        )
    lower, upper = np.percentile(draws, [2.5, 97.5])
    return float(roc_auc_score(y, second) - roc_auc_score(y, first)), float(lower), float(upper)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--family", default=training.HIST_GRADIENT_BOOSTING, choices=training.KNOWN_FAMILIES)
    parser.add_argument("--resamples", type=int, default=500)
    args = parser.parse_args()
    from datetime import UTC, datetime

    raw = parse_batch(
        read_source_bytes(), batch_id="full", source_file="diabetic_data.csv",
        loaded_elsewhere=pl.DataFrame(schema={"encounter_id": pl.Int64, "batch_id": pl.String}), now=datetime.now(UTC),
    ).rows  # fmt: skip
    table = assign_split(with_history(build_features(clean(raw).frame), raw))
    parts = {name: table.filter(pl.col(SPLIT) == name) for name in ("train", "validation", "test")}
    test = parts["test"]
    y = training.labels(test)
    probabilities = {}
    for name, blank in (("without history", True), ("with history", False)):
        train, validation, scored = parts["train"], parts["validation"], test
        if blank:  # history features held at a first encounter's values: the learner cannot use them
            first = [pl.lit(0.0).alias(c) for c in HISTORY_FEATURES]
            train, validation, scored = (f.with_columns(first) for f in (train, validation, test))
        (candidate,) = training.train_candidates(train, validation, families=(args.family,))
        probabilities[name] = training.predict_probability(candidate.model, scored)
        print(f"{args.family} {name}: test ROC-AUC {roc_auc_score(y, probabilities[name]):.4f}, fit {candidate.fit_seconds:.1f} s")
    gain, lower, upper = paired_auc_difference(
        test["patient_nbr"].to_numpy(), y, probabilities["without history"], probabilities["with history"], resamples=args.resamples
    )
    seen = float((test["history_prior_encounters"] > 0).mean())
    print(f"gain {gain:+.4f} [{lower:+.4f}, {upper:+.4f}] (paired patient bootstrap, {args.resamples} draws); "
          f"{seen:.0%} of {test.height} test encounters have an earlier one; {len(features.FEATURE_COLUMNS)} features")  # fmt: skip


if __name__ == "__main__":
    main()
