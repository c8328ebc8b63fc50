"""Time live_performance's work over 1,000,000 logged predictions with their outcomes, beside a plain pandas
join-and-score baseline measured in the same run: read the log (SQLite) and the outcomes (DuckDB), join, and score
each model version. The outcomes land as 50 files; live_performance runs as a file lands, so a round times its run
after the newest file, the ones before already joined and measured, and the first run over a warehouse none of whose
files were joined yet is timed once too."""

from __future__ import annotations

import argparse
import json
import os
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
from readmission_platform.lib.predictions import newest_predictions, read_predictions
from readmission_platform.lib.warehouse import open_warehouse
from readmission_platform.serving.model import SMOKE_ENCOUNTERS
from readmission_platform.serving.prediction_log import PredictionLog

RESULTS = Path(__file__).parent / "results" / "live.json"
TARGET_RATIO = 5.0
VERSIONS = ("4", "5", "6")
CHUNK = 20_000
FILES = 50


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
        "request_id": [f"r{i}" for i in range(rows)], "readmitted_30d": np.concatenate(readmitted), "known_at": now,
        "line_number": np.arange(2, rows + 2), "ingested_at": now,
    })  # fmt: skip
    with open_warehouse(warehouse_url) as store:
        for i, part in enumerate(outcomes.iter_slices(-(-rows // FILES)), start=1):
            batch_id = f"outcomes_{i:04d}"
            part = part.with_columns(batch_id=pl.lit(batch_id), source_file=pl.lit(f"{batch_id}.csv"))
            store.replace_batch({OUTCOMES: (OUTCOME_SCHEMA, part.select(list(OUTCOME_SCHEMA)).cast(OUTCOME_SCHEMA))}, batch_id)


def platform_run(url: str, warehouse_url: str) -> pl.DataFrame:
    """What live_performance computes: the files of outcomes not joined yet joined to the log's answers to their
    requests, each version's figures with their resampled intervals and its figures per day (those of a version whose
    outcomes did not change kept as stored), and the version behind the newest prediction."""
    with open_warehouse(warehouse_url) as store:
        live.update_joined(store, lambda ids: read_predictions(url, live.PREDICTION_COLUMNS, request_ids=ids), datetime.now(UTC))
        figures = live.measure(store, {}, now=datetime.now(UTC)).figures
    newest_predictions(url, ["model_version"])
    return figures


def rejoin_run(url: str, warehouse_url: str) -> pl.DataFrame:
    """What live_performance computed before the running join (the version before this one): the whole log and all
    outcomes read, joined, and every version scored, on every run."""
    predictions = read_predictions(url, live.PREDICTION_COLUMNS)
    with open_warehouse(warehouse_url) as store:
        outcomes = store.query(f"SELECT request_id, readmitted_30d FROM {OUTCOMES}")
    joined = live.join_outcomes(predictions, outcomes)
    live.by_period(joined)
    return live.live_figures(joined, {})


def forget_newest_file(warehouse_url: str) -> str:
    """Take the newest file of outcomes out of the running join, as if it had just landed; its name."""
    with open_warehouse(warehouse_url) as store:
        batch_id = store.query(f"SELECT max(batch_id) AS newest FROM {OUTCOMES}")["newest"][0]
        with store.batch_writer(batch_id) as writer:
            writer.put(live.JOINED, live.JOINED_SCHEMA, pl.DataFrame(schema=live.JOINED_SCHEMA))
            writer.put(live.JOINED_FILES, live.FILE_SCHEMA, pl.DataFrame(schema=live.FILE_SCHEMA))
    return batch_id


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
        timed = lambda run: (time.perf_counter(), run(), time.perf_counter())  # noqa: E731
        first_baseline = timed(lambda: baseline_run(url, warehouse_path))
        first_platform = timed(lambda: platform_run(url, warehouse_url))
        first = {"platform": first_platform[2] - first_platform[0], "baseline": first_baseline[2] - first_baseline[0]}
        times: dict[str, list[float]] = {"platform": [], "baseline": [], "rejoin": []}
        runs = {
            "platform": lambda: platform_run(url, warehouse_url), "baseline": lambda: baseline_run(url, warehouse_path),
            "rejoin": lambda: rejoin_run(url, warehouse_url),
        }  # fmt: skip
        for _ in range(args.repeats):  # side by side, alternating, so all see the same machine
            newest = forget_newest_file(warehouse_url)
            for name, run in runs.items():
                started, result, ended = timed(run)
                times[name].append(ended - started)
                if name == "platform":
                    figures = result
        plain = baseline_run(url, warehouse_path).set_index("model_version")
        for row in figures.filter(pl.col("metric") == "roc_auc").iter_rows(named=True):
            assert abs(row["estimate"] - plain.loc[row["model_version"], "roc_auc"]) < 1e-9, "the two disagree"
    medians = {name: statistics.median(values) for name, values in times.items()}
    ratio = medians["baseline"] / medians["platform"]
    print(f"first live_performance, none of the {FILES} files joined yet: {first['platform']:.2f} s against the baseline's "
          f"{first['baseline']:.2f} s ({first['baseline'] / first['platform']:.1f}×)")  # fmt: skip
    print(f"live_performance after {newest} landed (with 200-resample intervals and the daily figures): median {medians['platform']:.2f} s")
    print(f"pandas join-and-score baseline of everything (estimates only):                     median {medians['baseline']:.2f} s")
    print(f"the previous version's run, joining everything every time:                       median {medians['rejoin']:.2f} s")
    print(f"ratio {ratio:.1f}× (target ≥ {TARGET_RATIO:.0f}×) over {args.repeats} runs each; load average {os.getloadavg()[0]:.1f}")
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps({
        "rows": args.rows, "files": FILES, "repeats": args.repeats, "seconds": times, "medians": medians, "ratio": ratio,
        "first_run_seconds": first, "load_average": os.getloadavg(),
        "machine": platform.platform(), "measured_at": datetime.now(UTC).isoformat(),
    }, indent=2))  # fmt: skip


if __name__ == "__main__":
    main()
