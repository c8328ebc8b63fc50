"""The batch drift trigger on the bundled file's batches before and after its change, then `serving_psi` over
1,000,000 logged predictions beside a plain pandas PSI of the same features, measured in the same run."""

from __future__ import annotations

import argparse
import statistics
import time
from datetime import UTC, datetime

import numpy as np
import pandas as pd
import polars as pl

from readmission_platform.lib.cleaning import clean, clean_request
from readmission_platform.lib.drift import EMPTY_SHARE, NUMERIC_BINS, PSI_SIGNIFICANT, psi_report, serving_psi
from readmission_platform.lib.encounter import REQUEST_DTYPES
from readmission_platform.lib.features import CATEGORICAL_FEATURES, NUMERIC_FEATURES, build_features, feature_values
from readmission_platform.lib.ingest import parse_batch
from readmission_platform.lib.landing import split_batches
from readmission_platform.lib.pipeline import NOTHING_LOADED
from readmission_platform.lib.source import read_source_bytes
from readmission_platform.lib.splitting import SPLIT, assign_split

VERSIONS = ("1", "2", "3", "4")
# A stand-in for the model's probability: the PSI's cost does not depend on where the numbers came from.
PROBABILITY = (1 / (1 + (2 - 0.5 * pl.col("number_inpatient")).exp())).alias("probability")


def bundled_batches() -> list[pl.DataFrame]:
    frames = []
    for i, data in enumerate(split_batches(read_source_bytes()), start=1):
        parsed = parse_batch(data, batch_id=f"batch_{i:04d}", source_file="f.csv", loaded_elsewhere=NOTHING_LOADED, now=datetime.now(UTC))
        frames.append(clean(parsed.rows).frame)
    return frames


def training_rows(clean_rows: pl.DataFrame) -> pl.DataFrame:
    return assign_split(build_features(clean_rows)).filter(pl.col(SPLIT) == "train")


def print_batch_trigger(batches: list[pl.DataFrame]) -> None:
    print("batch drift on the bundled file: largest PSI (feature), features at or above the threshold")
    print(f"{'batch':<8}{'before: all training rows, 0.2':<48}{'after: newest training batch, 0.25'}")
    for k in range(1, len(batches)):
        before = psi_report(pl.concat([training_rows(b) for b in batches[:k]]), build_features(batches[k]))
        after = psi_report(training_rows(batches[k - 1]), build_features(batches[k]))
        cells = [
            f"{r['psi'][0]:.3f} ({r['feature'][0]}), {r.filter(pl.col('psi') >= t).height} ≥ {t}"
            for r, t in ((before, 0.2), (after, PSI_SIGNIFICANT))
        ]
        print(f"{k + 1:<8}{cells[0]:<48}{cells[1]}")


def logged(clean_rows: pl.DataFrame, rows: int) -> pl.DataFrame:
    """`rows` predictions as the log holds them: the bundled encounters repeated, spread over four versions."""
    one = pl.concat(
        [clean_rows.select(pl.col(n).cast(t) for n, t in REQUEST_DTYPES.items()), build_features(clean_rows).select(PROBABILITY)],
        how="horizontal",
    )
    many = pl.concat([one] * (rows // one.height + 1)).head(rows)
    return many.with_columns(pl.lit(np.array(VERSIONS)[np.arange(rows) % len(VERSIONS)]).alias("model_version"))


def pandas_psi(predictions: pd.DataFrame, reference: pd.DataFrame) -> pd.DataFrame:
    """The same PSI the plain way: reference deciles by pandas, then per version and feature value_counts."""
    numeric = [*NUMERIC_FEATURES, "probability"]
    out = []
    bins = {}
    for name in numeric:
        edges = sorted(set(reference[name].quantile([q / NUMERIC_BINS for q in range(1, NUMERIC_BINS)]).dropna()))
        bins[name] = [-np.inf, *edges, np.inf]

    def binned(frame: pd.DataFrame, name: str) -> pd.Series:
        if name in bins:
            return pd.cut(frame[name], bins[name], right=True, labels=False).astype("string").fillna("missing")
        return frame[name].astype("string").fillna("missing")

    expected = {name: binned(reference, name).value_counts(normalize=True) for name in [*numeric, *CATEGORICAL_FEATURES]}
    for version, group in predictions.groupby("model_version"):
        for name, e in expected.items():
            a = binned(group, name).value_counts(normalize=True)
            e2, a2 = e.align(a, fill_value=0.0)
            e2, a2 = e2.clip(lower=EMPTY_SHARE), a2.clip(lower=EMPTY_SHARE)
            out.append((version, name, float(((a2 - e2) * np.log(a2 / e2)).sum())))
    return pd.DataFrame(out, columns=["model_version", "feature", "psi"])


def pandas_features(predictions: pl.DataFrame) -> pd.DataFrame:
    """The baseline gets the features ready-made (the platform derives them from the logged fields in its time)."""
    features = feature_values(clean_request(predictions))
    return pl.concat([features, predictions.select("model_version", "probability")], how="horizontal").to_pandas()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    batches = bundled_batches()
    print_batch_trigger(batches)

    reference = training_rows(batches[-2]).with_columns(PROBABILITY)
    predictions = logged(pl.concat(batches), args.rows)
    baseline_input, baseline_reference = pandas_features(predictions), reference.to_pandas()
    platform = serving_psi(predictions, reference)
    baseline = pandas_psi(baseline_input, baseline_reference)
    joined = platform.join(pl.from_pandas(baseline), on=["model_version", "feature"], suffix="_pandas")
    assert joined.height == platform.height and np.allclose(joined["psi"], joined["psi_pandas"]), "the two PSIs differ"
    times: dict[str, list[float]] = {"serving_psi (polars, from logged fields)": [], "pandas PSI (from features)": []}
    for _ in range(args.repeats):  # the two take turns, so the shared machine's load hits both alike
        for name, run in zip(times, (lambda: serving_psi(predictions, reference), lambda: pandas_psi(baseline_input, baseline_reference)), strict=True):
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    print(f"\nserving drift over {args.rows:,} logged predictions, {len(VERSIONS)} versions, medians of {args.repeats}")
    medians = {name: statistics.median(t) for name, t in times.items()}
    for name, median in medians.items():
        print(f"  {name:<44}{median:8.2f} s")
    ratio = medians["pandas PSI (from features)"] / medians["serving_psi (polars, from logged fields)"]
    print(f"  ratio {ratio:.1f}× (target ≥ 5×: {'met' if ratio >= 5 else 'NOT met'})")


if __name__ == "__main__":
    main()
