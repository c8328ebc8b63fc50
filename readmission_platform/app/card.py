"""The Model page's tables: the model card of the version serving as /model tells it, and the promotion history and
live performance the warehouse records, for a service whose /model does not carry them."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import polars as pl

from readmission_platform.lib.live import LIVE_TABLE as LIVE
from readmission_platform.lib.promotion import DECISIONS as PROMOTIONS
from readmission_platform.lib.warehouse import open_warehouse

PROMOTION_COLUMNS = ("decided_at", "action", "challenger_version", "champion_version", "production_version",
                     "challenger_test_roc_auc", "champion_test_roc_auc", "reason")  # fmt: skip
# The sections of a model card the page draws when /model has them (learner and rollout keys), by key.
SECTIONS = {
    "calibration": "Calibration",
    "subgroups": "Subgroups",
    "promotion_history": "Promotion history",
    "live_performance": "Live performance",
}


def figure(value: Any) -> str:
    """A metric as text: a number, or an estimate with its interval ({estimate, lower, upper})."""
    if isinstance(value, Mapping):
        estimate = value.get("estimate", value.get("value"))
        if estimate is None:
            return ", ".join(f"{k} {figure(v)}" for k, v in value.items())
        if value.get("lower") is not None and value.get("upper") is not None:
            return f"{estimate:.3f} ({value['lower']:.3f} to {value['upper']:.3f})"
        return f"{estimate:.3f}"
    if isinstance(value, float):
        return f"{value:.3f}"
    return "" if value is None else str(value)


def metrics_table(info: Mapping[str, Any]) -> pl.DataFrame:
    """One row per metric, a column per split /model reports (test, validation), intervals where given."""
    splits = {key.removesuffix("_metrics"): value for key, value in info.items()
              if key.endswith("_metrics") and isinstance(value, Mapping)}  # fmt: skip
    names = sorted({name for metrics in splits.values() for name in metrics})
    return pl.DataFrame(
        {"metric": names, **{split: [figure(metrics.get(name)) for name in names] for split, metrics in splits.items()}},
        schema={"metric": pl.String, **dict.fromkeys(splits, pl.String)},
    )


def table(value: Any) -> pl.DataFrame | None:
    """A section of /model as a table: a list of records, or a mapping of columns; None if it is neither."""
    try:
        if isinstance(value, list) and value and all(isinstance(v, Mapping) for v in value):
            return pl.DataFrame(value, infer_schema_length=None)
        if isinstance(value, Mapping) and value and all(isinstance(v, list) for v in value.values()):
            return pl.DataFrame(dict(value))
    except (pl.exceptions.PolarsError, TypeError, ValueError):
        return None
    return None


def recorded(warehouse_url: str) -> dict[str, pl.DataFrame]:
    """The warehouse's promotion decisions (newest first) and live performance; a table not made yet is left out."""
    store = open_warehouse(warehouse_url)
    found = {}
    decisions = store.query(f"SELECT * FROM {PROMOTIONS}")
    if decisions.height:
        found["promotion_history"] = decisions.sort("decided_at", descending=True).select(
            [c for c in PROMOTION_COLUMNS if c in decisions.columns]
        )
    live = store.query(f"SELECT * FROM {LIVE}")
    if live.height:  # `inputs` is the platform's digest of what the figures came from, nothing a reader uses
        found["live_performance"] = live.drop("inputs", strict=False)
    return found
