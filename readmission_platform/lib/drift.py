"""Population stability index of every feature: how far a batch, or a day's served predictions, moved from training."""

from __future__ import annotations

import polars as pl

from readmission_platform.lib.cleaning import clean_request
from readmission_platform.lib.features import CATEGORICAL_FEATURES, ENCOUNTER_NUMERIC_FEATURES, feature_values

# The credit-scoring reading of PSI (Siddiqi): below 0.1 stable, 0.1 to 0.25 moderate, from 0.25 significant. At 0.2
# the bundled file's steady later batches warned on payer_code (README, Drift).
PSI_MODERATE = 0.1
PSI_SIGNIFICANT = 0.25
NUMERIC_BINS = 10
# Stands in for the share of an empty bin, so a category never seen in training gives a large, finite PSI.
EMPTY_SHARE = 1e-4
MISSING_BIN = "missing"
_WHOLE = "__whole__"
# The prediction log's columns for the serving model's version and its answer.
VERSION = "model_version"
PROBABILITY = "probability"


def _numeric_breaks(reference: pl.DataFrame, numeric: tuple[str, ...]) -> dict[str, list[float]]:
    """Deciles of the reference with ties merged, so a constant column gets one break and two bins."""
    if not numeric:
        return {}
    quantiles = [q / NUMERIC_BINS for q in range(1, NUMERIC_BINS)]
    deciles = reference.select(
        pl.concat_list(pl.col(name).cast(pl.Float64).quantile(q, "linear") for q in quantiles).alias(name)
        for name in numeric
    ).row(0, named=True)
    return {name: sorted({v for v in values if v is not None}) for name, values in deciles.items()}


def _binned(name: str, breaks: list[float] | None) -> pl.Expr:
    """A feature's bin: its category, or for a number the index of its decile; null (a bin of its own) stays null."""
    value = pl.col(name)
    if breaks is None:
        return value.cast(pl.String)
    # Bin i holds (breaks[i-1], breaks[i]]; with no breaks (an all-null reference) every value shares bin 0.
    edges = pl.lit(pl.Series(breaks, dtype=pl.Float64))
    return pl.when(value.is_not_null()).then(edges.search_sorted(value.cast(pl.Float64), side="left"))


def _counts(frame: pl.LazyFrame, bins: dict[str, pl.Expr], by: list[str]) -> list[pl.LazyFrame]:
    # A group-by per feature on the bins as they are, named as text only once counted: on a million rows this is
    # several times faster than one group-by over every feature's bins unpivoted as text.
    return [
        frame.group_by(*by, expr.alias("bin"))
        .len()
        .select(*by, pl.lit(name).alias("feature"), pl.col("bin").cast(pl.String).fill_null(MISSING_BIN), "len")
        for name, expr in bins.items()
    ]


def _shares(counts: list[pl.DataFrame], by: list[str]) -> pl.DataFrame:
    return (
        pl.concat(counts)
        .with_columns((pl.col("len") / pl.col("len").sum().over(*by, "feature")).alias("share"))
        .drop("len")
    )


def _check_frame(name: str, frame: pl.DataFrame, columns: tuple[str, ...]) -> None:
    if frame.is_empty():
        raise ValueError(f"the {name} frame has no rows; PSI compares two non-empty samples")
    missing = [column for column in columns if column not in frame.columns]
    if missing:
        raise ValueError(f"the {name} frame lacks feature columns {missing}; expected all it is asked to compare")


def _grouped_psi(
    reference: pl.DataFrame, current: pl.LazyFrame, by: str, numeric: tuple[str, ...], categorical: tuple[str, ...]
) -> pl.DataFrame:
    breaks = _numeric_breaks(reference, numeric)
    bins = {name: _binned(name, breaks[name]) for name in numeric} | {name: _binned(name, None) for name in categorical}
    # One collect for every feature's counts, so a plan that derives `current` runs once for all of them.
    rows, *counts = pl.collect_all([current.group_by(by).len("rows"), *_counts(current, bins, [by])])
    expected = rows.select(by).join(_shares(pl.collect_all(_counts(reference.lazy(), bins, [])), []), how="cross")
    actual = _shares(counts, [by])
    kinds = pl.DataFrame(
        {"feature": [*numeric, *categorical], "kind": ["numeric"] * len(numeric) + ["categorical"] * len(categorical)}
    )
    return (
        expected.join(actual, on=[by, "feature", "bin"], how="full", coalesce=True, suffix="_current")
        .with_columns(pl.col("share", "share_current").fill_null(0.0).clip(lower_bound=EMPTY_SHARE))
        .group_by(by, "feature")
        .agg(
            ((pl.col("share_current") - pl.col("share")) * (pl.col("share_current") / pl.col("share")).log())
            .sum()
            .alias("psi")
        )
        .join(kinds, on="feature")
        .join(rows, on=by)
        .sort(by, "psi", "feature", descending=[False, True, False])
    )


def grouped_psi_report(
    reference: pl.DataFrame,
    current: pl.DataFrame,
    by: str,
    *,
    numeric: tuple[str, ...] = ENCOUNTER_NUMERIC_FEATURES,
    categorical: tuple[str, ...] = CATEGORICAL_FEATURES,
) -> pl.DataFrame:
    """PSI of each feature of each group of `current` (by its column `by`) against all of `reference`.

    Columns `by`, feature, psi, kind, rows (the group's); per group largest first. Binned as `psi_report` bins.
    """
    for name, frame in (("reference", reference), ("current", current)):
        _check_frame(name, frame, (*numeric, *categorical))
    if by not in current.columns:
        raise ValueError(f"the current frame lacks the column {by!r} to group by; its columns are {current.columns}")
    return _grouped_psi(reference, current.lazy(), by, numeric, categorical)


def psi_report(
    reference: pl.DataFrame,
    current: pl.DataFrame,
    *,
    numeric: tuple[str, ...] = ENCOUNTER_NUMERIC_FEATURES,
    categorical: tuple[str, ...] = CATEGORICAL_FEATURES,
) -> pl.DataFrame:
    """PSI of each feature of `current` against `reference` (training rows): feature, psi, kind; largest first.

    Numeric features are binned at the reference deciles, categorical ones by category; null is a bin of its own.
    """
    whole = current.with_columns(pl.lit(0).alias(_WHOLE))
    return grouped_psi_report(reference, whole, _WHOLE, numeric=numeric, categorical=categorical).select(
        "feature", "psi", "kind"
    )


def serving_psi(predictions: pl.DataFrame, reference: pl.DataFrame) -> pl.DataFrame:
    """PSI of every feature and of the probability of logged predictions, per model version, against `reference`: the
    training rows' features with the production model's probability of each (`grouped_psi_report`'s columns)."""
    # The log holds no patient's history (only the features of the encounter as sent): drift is of those.
    numeric = (*ENCOUNTER_NUMERIC_FEATURES, PROBABILITY)
    _check_frame("predictions", predictions, (VERSION, PROBABILITY))
    _check_frame("reference", reference, (*numeric, *CATEGORICAL_FEATURES))
    # The cleaning and feature rules are selects: left lazy, polars fuses them with the counts that read them.
    served = pl.concat(
        [feature_values(clean_request(predictions.lazy())), predictions.lazy().select(VERSION, PROBABILITY)],
        how="horizontal",
    )
    return _grouped_psi(reference, served, VERSION, numeric, CATEGORICAL_FEATURES)
