"""The service's answers in words and tables a clinician reads: the risk, the threshold, what pushed the risk."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import polars as pl

from readmission_platform.app.form import LABELS
from readmission_platform.lib import schema
from readmission_platform.lib.features import NUMERIC_FEATURES

UP, DOWN = "raises the risk", "lowers the risk"
# Features `lib/features.py` derives, which the schema does not describe.
DERIVED_FEATURES = {
    "prior_visits": "outpatient, emergency and inpatient visits in the preceding year",
    "medications_prescribed": "diabetes medications taken",
    "medication_changes": "diabetes medications whose dose changed",
    "weight_recorded": "weight was recorded",
    "age_years": "age (middle of the bracket)",
}
TOP_CONTRIBUTIONS = 12


def percent(probability: float) -> str:
    return f"{100 * probability:.1f} %"


def risk_in_words(prediction: Mapping[str, Any], base_rate: float | None) -> str:
    """What the probability, its band and the threshold mean for this patient."""
    probability, threshold = prediction["probability"], prediction["threshold"]
    said = f"a {percent(probability)} probability of readmission within 30 days"
    usual = f" (the usual rate is {percent(base_rate)})" if base_rate is not None else ""
    if prediction["risk_band"] == "high":
        return (f"**High risk**: {said}, at or above the threshold of {percent(threshold)} at which the model flags a "
                "patient. Consider follow-up before or soon after discharge.")  # fmt: skip
    if prediction["risk_band"] == "medium":
        return (f"**Medium risk**: {said}, above the usual rate of readmission{usual} but below the threshold of "
                f"{percent(threshold)} at which the model flags a patient. Not flagged.")  # fmt: skip
    return f"**Low risk**: {said}, no higher than the usual rate of readmission{usual}. Not flagged."


def explained_elsewhere(prediction: Mapping[str, Any], explanation: Mapping[str, Any]) -> str | None:
    """What to say when the explanation is of another version than the one that gave the risk (during a canary the
    risk may be the candidate's, while explanations are always production's); None when they are the same."""
    if explanation["model_version"] == prediction["model_version"]:
        return None
    return (f"This explains version {explanation['model_version']} ({explanation['stage']}), which gives this encounter "
            f"{percent(explanation['probability'])}; the risk above is version {prediction['model_version']}'s "
            f"({prediction['stage']}).")  # fmt: skip


def feature_label(feature: str) -> str:
    """A feature's name with what it is, from the schema or the features' own definitions."""
    if feature in DERIVED_FEATURES:
        return f"{feature}: {DERIVED_FEATURES[feature]}"
    column = schema.CLEAN_BY_NAME.get(feature)
    return f"{feature}: {column.description}" if column is not None and column.description else feature


def contributions_frame(
    explanation: Mapping[str, Any], request: Mapping[str, Any] | None = None, top: int = TOP_CONTRIBUTIONS
) -> pl.DataFrame:
    """The `top` strongest pushes of an /explain answer, strongest first: what pushed (in words), its value, the push
    and its direction. Summed per recorded field when the answer gives `fields` (the value then as entered, from
    `request`), else per feature."""
    if explanation.get("fields"):
        given = request or {}
        rows = [
            (LABELS.get(f["field"], f["field"]), "" if given.get(f["field"]) is None else str(given[f["field"]]),
             float(f["contribution"]))
            for f in explanation["fields"]
        ]  # fmt: skip
    else:
        rows = [(feature_label(c["feature"]), _shown(c["feature"], c["value"]), float(c["contribution"]))
                for c in explanation["contributions"]]  # fmt: skip
    rows = sorted((r for r in rows if r[2] != 0), key=lambda r: -abs(r[2]))[:top]
    return pl.DataFrame(
        {
            "feature": [r[0] for r in rows],
            "value": [r[1] for r in rows],
            "contribution": [r[2] for r in rows],
            "direction": [UP if r[2] > 0 else DOWN for r in rows],
        },
        schema={"feature": pl.String, "value": pl.String, "contribution": pl.Float64, "direction": pl.String},
    )


def _shown(feature: str, value: Any) -> str:
    if feature in NUMERIC_FEATURES and isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)
