"""The LightGBM candidate's small grid (`training.PARAM_GRIDS`) against a time-boxed Optuna search (TPE) given the
same seconds, on the same training and validation rows of the whole data set: validation ROC-AUC of each best, and
test ROC-AUC with its patient-bootstrap interval. Tuning on validation only; the test part is scored once per best."""

from __future__ import annotations

import argparse
import json
import time
from datetime import UTC, datetime
from pathlib import Path

import optuna
import polars as pl

from readmission_platform.lib import metrics
from readmission_platform.lib.cleaning import clean
from readmission_platform.lib.features import build_features
from readmission_platform.lib.ingest import parse_batch
from readmission_platform.lib.pipeline import NOTHING_LOADED
from readmission_platform.lib.source import read_source_bytes
from readmission_platform.lib.splitting import SPLIT, assign_split
from readmission_platform.lib.training import LIGHTGBM, PARAM_GRIDS, labels, predict_probability, train_candidates

RESULTS = Path(__file__).parent / "results" / "search.json"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--resamples", type=int, default=200, help="patient bootstrap resamples (default 200)")
    args = parser.parse_args(argv)
    parsed = parse_batch(read_source_bytes(), batch_id="all", source_file="all.csv", loaded_elsewhere=NOTHING_LOADED, now=datetime.now(UTC))
    frame = assign_split(build_features(clean(parsed.rows).frame))
    train, validation, test = (frame.filter(pl.col(SPLIT) == side) for side in ("train", "validation", "test"))

    started = time.perf_counter()
    (grid,) = train_candidates(train, validation, families=(LIGHTGBM,), search_seconds=float("inf"))
    box = time.perf_counter() - started

    def objective(trial: optuna.Trial) -> float:
        params = {
            "num_leaves": trial.suggest_int("num_leaves", 7, 63, log=True),
            "n_estimators": trial.suggest_int("n_estimators", 100, 500, step=50),
            "min_child_samples": trial.suggest_int("min_child_samples", 20, 200, log=True),
            "colsample_bytree": trial.suggest_float("colsample_bytree", 0.5, 1.0),
        }
        (found,) = train_candidates(train, validation, families=(LIGHTGBM,), grids={LIGHTGBM: (params,)})
        trial.set_user_attr("candidate", found)
        return found.validation["roc_auc"]

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=0))
    study.optimize(objective, timeout=box)
    tuned = study.best_trial.user_attrs["candidate"]

    y = labels(test)
    rows = {}
    for name, candidate, seconds, settings in (("grid", grid, box, len(PARAM_GRIDS[LIGHTGBM])), ("optuna", tuned, box, len(study.trials))):
        p = predict_probability(candidate.model, test)
        interval = metrics.bootstrap_intervals(test["patient_nbr"], y, p, resamples=args.resamples).row(0, named=True)
        rows[name] = {"settings_tried": settings, "seconds": round(seconds, 1), "params": candidate.params,
                      "validation_roc_auc": round(candidate.validation["roc_auc"], 4),
                      "test_roc_auc": [round(interval[k], 4) for k in ("estimate", "lower", "upper")]}  # fmt: skip
        print(f"{name:<7} {settings} settings in {seconds:.0f} s: validation ROC-AUC {rows[name]['validation_roc_auc']:.4f}, "
              f"test {interval['estimate']:.4f} [{interval['lower']:.4f}, {interval['upper']:.4f}]  {candidate.params}")  # fmt: skip
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(rows, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
