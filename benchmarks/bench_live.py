"""Time live_performance's work over 1,000,000 logged predictions with their outcomes, beside a plain pandas
join-and-score baseline measured in the same run: read the log (SQLite) and the outcomes (DuckDB), join, and score
each model version."""

from __future__ import annotations

import argparse
import json
import platform
import sqlite3
import statistics
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd
import polars as pl
from scipy.optimize import brentq
from scipy.special import expit
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import average_precision_score, brier_score_loss, roc_auc_score

from readmission_platform.lib import live
from readmission_platform.lib.encounter import FIELDS, typed_frame
from readmission_platform.lib.outcomes import OUTCOME_SCHEMA, OUTCOMES
from readmission_platform.lib.predictions import read_predictions
from readmission_platform.lib.warehouse import open_warehouse
from readmission_platform.serving.model import SMOKE_ENCOUNTERS
from readmission_platform.serving.prediction_log import PredictionLog

RESULTS = Path(__file__).parent / "results" / "live.json"
TARGET_RATIO = 5.0
VERSIONS = ("4", "5", "6")
CHUNK = 20_000


def write_log(url: str, warehouse_url: str, rows: int, seed: int = 0) -> None:
    """`rows` predictions of three versions, one after the other, through the service's own writer, and an outcome for each."""
    rng = np.random.default_rng(seed)
    fields = typed_frame([{name: SMOKE_ENCOUNTERS[i % len(SMOKE_ENCOUNTERS)].get(name) for name in FIELDS} for i in range(CHUNK)])
    log = PredictionLog(url, capacity=rows, flush_seconds=0.05, batch_rows=CHUNK)
    readmitted = []
    for start in range(0, rows, CHUNK):
        p = rng.beta(1.2, 9, CHUNK)
        readmitted.append(rng.random(CHUNK) < p)
        frame = pl.DataFrame({
            "request_id": [f"r{i}" for i in range(start, start + CHUNK)], "endpoint": "predict_batch",
            "model_name": "readmission-classifier", "model_version": VERSIONS[start * len(VERSIONS) // rows],
            "probability": p, "decision": p >= 0.15, "risk_band": "low",
        })  # fmt: skip
        assert log.record_frame(pl.concat([frame, fields], how="horizontal")) == 0
    log.close()
    now = datetime.now(UTC)
    outcomes = pl.DataFrame({
        "batch_id": "outcomes_0001", "request_id": [f"r{i}" for i in range(rows)], "readmitted_30d": np.concatenate(readmitted),
        "known_at": now, "source_file": "outcomes_0001.csv", "line_number": np.arange(2, rows + 2), "ingested_at": now,
    }).cast(OUTCOME_SCHEMA)  # fmt: skip
    open_warehouse(warehouse_url).replace_batch({OUTCOMES: (OUTCOME_SCHEMA, outcomes)}, "outcomes_0001")


def platform_run(url: str, warehouse_url: str) -> pl.DataFrame:
    """What live_performance computes: the log and the outcomes read, joined, each version's figures with their
    resampled intervals, and the figures per day."""
    predictions = read_predictions(url, live.PREDICTION_COLUMNS)
    with open_warehouse(warehouse_url) as store:
        outcomes = store.query(f"SELECT request_id, readmitted_30d FROM {OUTCOMES}")
    joined = live.join_outcomes(predictions, outcomes)
    live.by_period(joined)
    return live.live_figures(joined, {})


def baseline_run(url: str, warehouse_path: str) -> pd.DataFrame:
    """The plain way: pandas reads both, merges, and scikit-learn scores each version (estimates only, no intervals)."""
    with sqlite3.connect(url.removeprefix("sqlite:///")) as connection:
        predictions = pd.read_sql(
            "SELECT request_id, predicted_at, model_version, probability, decision FROM predictions", connection
        )
    with duckdb.connect(warehouse_path, read_only=True) as connection:
        outcomes = connection.execute(f"SELECT request_id, readmitted_30d FROM {OUTCOMES}").df()
    predictions = predictions.drop_duplicates(["model_version", "request_id"], keep="last")
    joined = predictions.merge(outcomes, on="request_id")
    rows = []
    for version, part in joined.groupby("model_version"):
        y, p = part["readmitted_30d"].to_numpy().astype(int), part["probability"].to_numpy()
        logit = np.log(p / (1 - p))
        slope = LogisticRegression(C=np.inf).fit(logit[:, None], y).coef_[0, 0]
        intercept = brentq(lambda a: float(np.mean(expit(logit + a)) - y.mean()), -5, 5)
        rows.append({
            "model_version": version, "roc_auc": roc_auc_score(y, p), "pr_auc": average_precision_score(y, p),
            "brier": brier_score_loss(y, p), "calibration_slope": slope, "calibration_intercept": intercept,
            "positive_rate": part["decision"].mean(), "observed_rate": y.mean(),
        })  # fmt: skip
    return pd.DataFrame(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        url, warehouse_path = f"sqlite:///{folder}/predictions.sqlite", f"{folder}/warehouse.duckdb"
        warehouse_url = f"duckdb:///{warehouse_path}"
        started = time.perf_counter()
        write_log(url, warehouse_url, args.rows)
        print(f"{args.rows:,} predictions of {len(VERSIONS)} versions logged and their outcomes stored in {time.perf_counter() - started:.0f} s")
        times: dict[str, list[float]] = {"platform": [], "baseline": []}
        for _ in range(args.repeats):  # side by side, alternating, so both see the same machine
            for name, run in (("platform", lambda: platform_run(url, warehouse_url)), ("baseline", lambda: baseline_run(url, warehouse_path))):
                started = time.perf_counter()
                result = run()
                times[name].append(time.perf_counter() - started)
        figures = result if isinstance(result, pl.DataFrame) else platform_run(url, warehouse_url)
        plain = baseline_run(url, warehouse_path).set_index("model_version")
        for row in figures.filter(pl.col("metric") == "roc_auc").iter_rows(named=True):
            assert abs(row["estimate"] - plain.loc[row["model_version"], "roc_auc"]) < 1e-9, "the two disagree"
    medians = {name: statistics.median(values) for name, values in times.items()}
    ratio = medians["baseline"] / medians["platform"]
    print(f"live_performance (with 200-resample intervals and the daily figures): median {medians['platform']:.2f} s")
    print(f"pandas join-and-score baseline (estimates only):                   median {medians['baseline']:.2f} s")
    print(f"ratio {ratio:.1f}× (target ≥ {TARGET_RATIO:.0f}×) over {args.repeats} runs each")
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps({
        "rows": args.rows, "repeats": args.repeats, "seconds": times, "medians": medians, "ratio": ratio,
        "machine": platform.platform(), "measured_at": datetime.now(UTC).isoformat(),
    }, indent=2))  # fmt: skip


if __name__ == "__main__":
    main()
