"""The History page's rows: recent predictions from the prediction log with their outcome where it has come back.

No identifier is shown: the request id only joins a prediction to its outcome and is dropped after.
"""

from __future__ import annotations

from collections.abc import Sequence

import polars as pl

from readmission_platform.lib.outcomes import OUTCOMES
from readmission_platform.lib.predictions import newest_predictions
from readmission_platform.lib.warehouse import open_warehouse

RECENT = 1_000
# The clinical context shown beside each prediction: none of these identifies a patient.
CONTEXT = ("age", "gender", "diag_1", "time_in_hospital")
SHOWN = ("predicted_at", "endpoint", "model_version", "probability", "risk_band", "decision", *CONTEXT, "outcome")
AWAITED = "not known yet"


def stored_outcomes(warehouse_url: str, request_ids: Sequence[str]) -> pl.DataFrame:
    """request_id and readmitted_30d of the outcomes the warehouse holds for `request_ids`; none before the first has
    come back."""
    ids = list(dict.fromkeys(request_ids))
    found = pl.DataFrame()
    if ids:
        wanted = ", ".join(f"${i}" for i in range(1, len(ids) + 1))
        found = open_warehouse(warehouse_url).query(
            f"SELECT request_id, readmitted_30d FROM {OUTCOMES} WHERE request_id IN ({wanted})", ids
        )
    return found if found.width else pl.DataFrame(schema={"request_id": pl.String, "readmitted_30d": pl.Boolean})


def recent_predictions(predictions: pl.DataFrame, outcomes: pl.DataFrame, limit: int = RECENT) -> pl.DataFrame:
    """The `limit` latest predictions, newest first, as SHOWN: the outcome in words where it has matured."""
    latest = predictions.tail(limit).reverse()
    joined = latest.join(outcomes.unique("request_id", keep="first"), on="request_id", how="left", maintain_order="left")
    outcome = (
        pl.when(pl.col("readmitted_30d").is_null())
        .then(pl.lit(AWAITED))
        .when(pl.col("readmitted_30d"))
        .then(pl.lit("readmitted within 30 days"))
        .otherwise(pl.lit("not readmitted within 30 days"))
    )
    return joined.with_columns(outcome.alias("outcome")).select(SHOWN)


def read_recent(prediction_log_url: str, warehouse_url: str, limit: int = RECENT) -> pl.DataFrame:
    """`recent_predictions` of the platform's prediction log and warehouse, reading only the `limit` newest
    predictions and the outcomes of their requests."""
    columns = ["request_id", *(c for c in SHOWN if c != "outcome")]
    latest = newest_predictions(prediction_log_url, columns, limit).reverse()  # oldest first, as the log reads
    outcomes = stored_outcomes(warehouse_url, latest["request_id"].drop_nulls().to_list())
    return recent_predictions(latest, outcomes, limit)


def filtered(rows: pl.DataFrame, versions: Sequence[str], bands: Sequence[str]) -> pl.DataFrame:
    """The rows of the chosen versions and risk bands (none chosen: all)."""
    if versions:
        rows = rows.filter(pl.col("model_version").is_in(list(versions)))
    if bands:
        rows = rows.filter(pl.col("risk_band").is_in(list(bands)))
    return rows
