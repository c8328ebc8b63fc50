"""Time the retrain path on the whole data set and measure the promoted model's quality with patient-bootstrap
intervals, beside a bare HistGradientBoosting fit and the base-rate Brier score measured in the same run."""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import tempfile
import time
import warnings
from datetime import UTC, datetime
from pathlib import Path

import dagster as dg
import polars as pl
from sklearn.compose import make_column_transformer
from sklearn.ensemble import HistGradientBoostingClassifier
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import OrdinalEncoder

from readmission_platform.defs.promotion import checks as promotion_checks
from readmission_platform.defs.promotion.assets import promotion_decision
from readmission_platform.defs.resources import MlflowResource, WarehouseResource
from readmission_platform.defs.training import checks as training_checks
from readmission_platform.defs.training.assets import trained_model, training_set
from readmission_platform.lib import metrics
from readmission_platform.lib.cleaning import clean
from readmission_platform.lib.features import CATEGORICAL_FEATURES, FEATURE_SCHEMA, NUMERIC_FEATURES, build_features
from readmission_platform.lib.ingest import parse_batch
from readmission_platform.lib.landing import split_batches
from readmission_platform.lib.pipeline import NOTHING_LOADED
from readmission_platform.lib.source import read_source_bytes
from readmission_platform.lib.splitting import SPLIT, assign_split
from readmission_platform.lib.training import labels, model_input, predict_probability
from readmission_platform.lib.warehouse import open_warehouse

warnings.filterwarnings("ignore", category=dg.PreviewWarning)
logging.getLogger("mlflow").setLevel(logging.WARNING)
RESULTS = Path(__file__).parent / "results" / "training.json"
TARGET_ROC_AUC, TARGET_SECONDS = 0.665, 60.0
# Published models of this data set reach about 0.67; far above it, a label or patient leaks into the features.
LEAK_ROC_AUC = 0.72


def load_features(url: str) -> pl.DataFrame:
    """The full data set's features, batch by batch into the warehouse, as the ingestion assets leave them."""
    store = open_warehouse(url)
    tables = []
    for index, content in enumerate(split_batches(read_source_bytes()), start=1):
        batch_id = f"batch_{index:04d}"
        parsed = parse_batch(content, batch_id=batch_id, source_file=f"{batch_id}.csv", loaded_elsewhere=NOTHING_LOADED, now=datetime.now(UTC))
        table = build_features(clean(parsed.rows).frame)
        store.replace_batch({"features": (FEATURE_SCHEMA, table)}, batch_id)
        tables.append(table)
    return pl.concat(tables)


def retrain_once(url: str, folder: Path) -> tuple[float, dict, dict]:
    """One run of training_set → trained_model → promotion_decision into a fresh MLflow store."""
    mlflow = MlflowResource(tracking_uri=f"sqlite:///{folder / 'mlflow.db'}", artifact_root=(folder / "artifacts").as_uri())
    assets = [training_set, trained_model, promotion_decision]
    checks = dg.load_asset_checks_from_modules([training_checks, promotion_checks])
    with dg.instance_for_test() as instance:
        started = time.perf_counter()
        result = dg.materialize(
            [*assets, *checks],
            resources={"warehouse": WarehouseResource(url=url), "mlflow": mlflow},
            instance=instance,
            run_config={"loggers": {"console": {"config": {"log_level": "WARNING"}}}},
        )
        seconds = time.perf_counter() - started
    trained = {k: getattr(v, "value", v) for k, v in result.asset_materializations_for_node("trained_model")[0].metadata.items()}
    decided = {k: getattr(v, "value", v) for k, v in result.asset_materializations_for_node("promotion_decision")[0].metadata.items()}
    return seconds, trained, decided | {"tracking_uri": mlflow.tracking_uri}


def bare_gradient_boosting(train: pl.DataFrame, test: pl.DataFrame) -> tuple[float, dict]:
    """Scikit-learn's HistGradientBoosting with its defaults: the fit a notebook would start from."""
    encode = make_column_transformer(
        ("passthrough", list(NUMERIC_FEATURES)),
        (OrdinalEncoder(handle_unknown="use_encoded_value", unknown_value=-1), list(CATEGORICAL_FEATURES)),
    )
    model = make_pipeline(encode, HistGradientBoostingClassifier(categorical_features=[False] * len(NUMERIC_FEATURES) + [True] * len(CATEGORICAL_FEATURES), random_state=0))
    started = time.perf_counter()
    model.fit(model_input(train), labels(train))
    seconds = time.perf_counter() - started
    probability = model.predict_proba(model_input(test))[:, 1]
    return seconds, metrics.evaluate(labels(test), probability, threshold=0.5, prevalence=float(labels(train).mean()))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=3, help="retrain runs to take the median of (default 3)")
    parser.add_argument("--resamples", type=int, default=300, help="patient bootstrap resamples (default 300)")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="readmission_bench_") as tmp:
        folder = Path(tmp)
        url = f"duckdb:///{folder / 'warehouse.duckdb'}"
        frame = assign_split(load_features(url))
        train, test = frame.filter(pl.col(SPLIT) == "train"), frame.filter(pl.col(SPLIT) == "test")
        print(f"{frame.height:,} encounters: {train.height:,} train, {test.height:,} test", flush=True)

        runs = []
        for repeat in range(args.repeats):
            run_folder = folder / f"run{repeat}"
            run_folder.mkdir()
            runs.append(retrain_once(url, run_folder))
            print(f"  retrain path {runs[-1][0]:6.1f} s → v{runs[-1][2]['production_version']} ({runs[-1][1]['family']})", flush=True)
        seconds, trained, decided = runs[-1]
        bare_seconds, bare = bare_gradient_boosting(train, test)

        registry = MlflowResource(tracking_uri=decided["tracking_uri"]).registry()
        model = registry.load_model(decided["production_version"])
        y, probability = labels(test), predict_probability(model, test)
        intervals = metrics.bootstrap_intervals(test["patient_nbr"], y, probability, resamples=args.resamples)
        base_rate = metrics.base_rate_brier(y, float(labels(train).mean()))
        fit_times = {
            r.data.params["family"]: round(r.data.metrics["fit_seconds"], 2)
            for r in registry.client.search_runs([registry.experiment_id])
            if r.data.tags.get("dagster_run_id")
        }

    median_seconds = statistics.median(r[0] for r in runs)
    row = {m: intervals.filter(pl.col("metric") == m).row(0, named=True) for m in intervals["metric"]}
    results = {
        "measured_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "cpus": os.cpu_count(),
        "retrain_path_seconds": [round(r[0], 2) for r in runs],
        "retrain_path_median_seconds": round(median_seconds, 2),
        "fit_seconds_per_family": fit_times,
        "challenger_family": trained["family"],
        "promoted_test": {m: {k: round(v, 4) for k, v in row[m].items() if k != "metric"} for m in row},
        "base_rate_brier": round(base_rate, 4),
        "baseline_bare_hgb": {"fit_seconds": round(bare_seconds, 2), "roc_auc": round(bare["roc_auc"], 4), "pr_auc": round(bare["pr_auc"], 4), "brier": round(bare["brier"], 4)},
        "targets": {
            "roc_auc_at_least_0.665": row["roc_auc"]["estimate"] >= TARGET_ROC_AUC,
            "roc_auc_below_0.72_no_leak": row["roc_auc"]["estimate"] < LEAK_ROC_AUC,
            "brier_below_base_rate": row["brier"]["estimate"] < base_rate,
            "retrain_under_60_s": median_seconds < TARGET_SECONDS,
        },
    }
    print()
    print(f"retrain path (training_set → 3 families × grid → MLflow → decision), median of {len(runs)}: {median_seconds:.1f} s")
    print("  fit seconds per family (whole grid + calibration): " + ", ".join(f"{k} {v}" for k, v in fit_times.items()))
    print(f"  baseline: one bare HistGradientBoosting fit {bare_seconds:.1f} s → path / bare fit = {median_seconds / bare_seconds:.1f}×")
    print(f"promoted model ({trained['family']}), test part, 95 % intervals from {args.resamples} patient resamples:")
    for metric_name in ("roc_auc", "pr_auc", "brier"):
        r = row[metric_name]
        bare_value = bare[metric_name]
        print(f"  {metric_name:<8} {r['estimate']:.4f}  [{r['lower']:.4f}, {r['upper']:.4f}]   bare HGB {bare_value:.4f}")
    print(f"  base-rate Brier {base_rate:.4f}")
    for name, met in results["targets"].items():
        print(f"  target {name}: {'met' if met else 'NOT met'}")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nwritten to {RESULTS}")


if __name__ == "__main__":
    main()
