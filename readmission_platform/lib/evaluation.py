"""Scoring a fitted model on a part of the training set: metrics, subgroups, and the tables a reviewer reads."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import polars as pl

from readmission_platform.lib import metrics
from readmission_platform.lib.training import labels, predict_probability

# Whom the model may serve worse: these groups are reported for every evaluation.
SUBGROUP_COLUMNS = ("gender", "race", "age_band")
AGE_BANDS = ((0, 40, "<40"), (40, 60, "40-59"), (60, 80, "60-79"), (80, 200, "80+"))


def age_band(age_years: pl.Expr) -> pl.Expr:
    expression = pl.lit(None, pl.String)
    for lo, hi, name in reversed(AGE_BANDS):
        expression = pl.when((age_years >= lo) & (age_years < hi)).then(pl.lit(name)).otherwise(expression)
    return expression


def evaluate_model(model, part: pl.DataFrame, *, threshold: float, prevalence: float) -> dict[str, float]:
    """Ranking, calibration and threshold metrics of `model` on `part` (a slice of the training set)."""
    return metrics.evaluate(labels(part), predict_probability(model, part), threshold=threshold, prevalence=prevalence)


def with_age_band(part: pl.DataFrame) -> pl.DataFrame:
    return part.with_columns(age_band=age_band(pl.col("age_years")))


def subgroups(part: pl.DataFrame) -> Iterator[tuple[str, str, np.ndarray]]:
    """(attribute, group, its rows as a boolean mask) of every gender, race and age-band group of `part`, named as
    `subgroup_tables` names them."""
    groups = with_age_band(part)
    for column in SUBGROUP_COLUMNS:
        names = metrics.group_labels(groups[column])
        for group in names.unique().sort():
            yield column, group, (names == group).to_numpy()


def subgroup_tables(model, part: pl.DataFrame, *, threshold: float) -> pl.DataFrame:
    """ROC-AUC, Brier, positive rate and calibration by gender, race and age band, one row per group."""
    y, p = labels(part), predict_probability(model, part)
    groups = with_age_band(part)
    return pl.concat(
        [
            metrics.subgroup_report(groups[name], y, p, threshold=threshold).insert_column(0, pl.lit(name).alias("by"))
            for name in SUBGROUP_COLUMNS
        ]
    )
