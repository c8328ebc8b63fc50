"""The model-ready feature table, computed from clean rows the same way for training and serving.

A model's input is the encounter's own features (`ENCOUNTER_FEATURES`, the per-batch `features` table) and the
patient's point-in-time history (`history.HISTORY_FEATURES`, which needs the patient's earlier encounters and is added
by the training set and, at serving, from the patient's stored state): `FEATURE_COLUMNS`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import polars as pl

from readmission_platform.lib import schema
from readmission_platform.lib.history import HISTORY_FEATURES, history_expressions, record_history

# Constant or nearly constant over the data set (at most 3 rows differ from "No"): no signal.
UNINFORMATIVE_MEDICATIONS = ("examide", "citoglipton", "acetohexamide", "troglitazone", "metformin-rosiglitazone")
MEDICATION_FEATURES = tuple(m for m in schema.MEDICATIONS if m not in UNINFORMATIVE_MEDICATIONS)
MISSING_CATEGORY = "missing"

ENCOUNTER_NUMERIC_FEATURES = (
    "age_years",
    "time_in_hospital",
    "num_lab_procedures",
    "num_procedures",
    "num_medications",
    "number_outpatient",
    "number_emergency",
    "number_inpatient",
    "number_diagnoses",
    "prior_visits",
    "medications_prescribed",
    "medication_changes",
    "weight_recorded",
)
CATEGORICAL_FEATURES = (
    "race",
    "gender",
    "admission_type_id",
    "discharge_disposition_id",
    "admission_source_id",
    "payer_code",
    "medical_specialty",
    "diag_1_group",
    "diag_2_group",
    "diag_3_group",
    "max_glu_serum",
    "A1Cresult",
    *MEDICATION_FEATURES,
    "change",
    "diabetesMed",
)
ENCOUNTER_FEATURES = ENCOUNTER_NUMERIC_FEATURES + CATEGORICAL_FEATURES  # the features table's
NUMERIC_FEATURES = ENCOUNTER_NUMERIC_FEATURES + HISTORY_FEATURES
FEATURE_COLUMNS = NUMERIC_FEATURES + CATEGORICAL_FEATURES  # a model's input
LINEAGE_COLUMNS = (schema.BATCH_ID, *schema.IDENTIFIERS)
LABEL_COLUMNS = (schema.LABEL_30D, schema.LABEL)

FEATURE_SCHEMA: dict[str, pl.DataType] = (
    {schema.BATCH_ID: pl.String()}
    | {name: pl.Int64() for name in schema.IDENTIFIERS}
    | {schema.LABEL_30D: pl.Boolean(), schema.LABEL: pl.String()}
    | {name: pl.Float64() for name in ENCOUNTER_NUMERIC_FEATURES}
    | {name: pl.String() for name in CATEGORICAL_FEATURES}
)
HISTORY_SCHEMA: dict[str, pl.DataType] = {name: pl.Float64() for name in HISTORY_FEATURES}


@dataclass(frozen=True)
class Total:
    """The sum of some count columns."""

    columns: tuple[str, ...]

    def expr(self) -> pl.Expr:
        return pl.sum_horizontal(pl.col(c) for c in self.columns)

    def of(self, row: Mapping[str, Any]) -> int:
        return sum(row[c] for c in self.columns)


@dataclass(frozen=True)
class Count:
    """How many of some columns hold one of `values` (or, with `outside`, any other value)."""

    columns: tuple[str, ...]
    values: tuple[str, ...]
    outside: bool = False

    def expr(self) -> pl.Expr:
        held = (pl.col(c).is_in(self.values) for c in self.columns)
        return pl.sum_horizontal(~h if self.outside else h for h in held)

    def of(self, row: Mapping[str, Any]) -> int:
        # A missing value counts for nothing, as polars' sum_horizontal skips nulls.
        return sum(row[c] is not None and (row[c] in self.values) != self.outside for c in self.columns)


@dataclass(frozen=True)
class Recorded:
    """Whether a column holds a value."""

    column: str

    def expr(self) -> pl.Expr:
        return pl.col(self.column).is_not_null()

    def of(self, row: Mapping[str, Any]) -> bool:
        return row[self.column] is not None


# The features computed from several clean columns, each declared once and evaluated either over a frame (`expr`,
# for batches) or over one encounter (`of`, for the serving path).
DERIVED: dict[str, Total | Count | Recorded] = {
    "prior_visits": Total(("number_outpatient", "number_emergency", "number_inpatient")),
    "medications_prescribed": Count(MEDICATION_FEATURES, ("No",), outside=True),
    "medication_changes": Count(MEDICATION_FEATURES, ("Up", "Down")),
    "weight_recorded": Recorded("weight"),
}


# The recorded field a clinician knows each feature by, for explanations summed per field. A feature not named here is
# a field of the encounter itself; one whose name starts with HISTORY_PREFIX comes from the patient's earlier
# encounters and is shown as HISTORY.
HISTORY_PREFIX, HISTORY = "history_", "history"
FEATURE_FIELDS = {
    "age_years": "age",
    "weight_recorded": "weight",
    "diag_1_group": "diag_1",
    "diag_2_group": "diag_2",
    "diag_3_group": "diag_3",
    # The visits of the year before: each count, and their sum, are one topic.
    "number_outpatient": "visits_in_prior_year",
    "number_emergency": "visits_in_prior_year",
    "number_inpatient": "visits_in_prior_year",
    "prior_visits": "visits_in_prior_year",
    # Counted over every medication column: no one drug's field.
    "medications_prescribed": "medications_overall",
    "medication_changes": "medications_overall",
}


def field_of(feature: str) -> str:
    """The field a clinician recognises a feature by (`FEATURE_FIELDS`; history features as HISTORY)."""
    if feature.startswith(HISTORY_PREFIX):
        return HISTORY
    return FEATURE_FIELDS.get(feature, feature)


def by_field(terms: Mapping[str, float]) -> dict[str, dict[str, float]]:
    """Features' terms grouped by `field_of`: field → {feature: term}, in the order the features come."""
    fields: dict[str, dict[str, float]] = {}
    for feature, term in terms.items():
        fields.setdefault(field_of(feature), {})[feature] = term
    return fields


def _feature_expressions() -> list[pl.Expr]:
    numeric = [
        (DERIVED[name].expr() if name in DERIVED else pl.col(name)).cast(pl.Float64).alias(name)
        for name in ENCOUNTER_NUMERIC_FEATURES
    ]
    categorical = [pl.col(name).cast(pl.String).fill_null(MISSING_CATEGORY).alias(name) for name in CATEGORICAL_FEATURES]
    return numeric + categorical


_FEATURES = _feature_expressions()  # in ENCOUNTER_FEATURES order
_TABLE = [pl.col(name) for name in (schema.BATCH_ID, *schema.IDENTIFIERS, schema.LABEL_30D, schema.LABEL)] + _FEATURES
assert [e.meta.output_name() for e in _TABLE] == list(FEATURE_SCHEMA)


def build_features(clean: pl.DataFrame) -> pl.DataFrame:
    """Clean rows → identifiers, labels and the declared feature columns, in `FEATURE_SCHEMA` order."""
    return clean.select(_TABLE)


def feature_values(clean: pl.DataFrame | pl.LazyFrame, states: pl.DataFrame | None = None) -> pl.DataFrame | pl.LazyFrame:
    """Clean rows → the model's feature columns (`FEATURE_COLUMNS`), by the rules of `build_features`.

    `states`: each row's patient `history.STATE` (a null row: none known); without it every row has the history of
    a first encounter. A lazy frame stays lazy.
    """
    encounter = clean.select(_FEATURES)
    if states is not None:
        encounter = pl.concat([encounter, states.lazy() if isinstance(encounter, pl.LazyFrame) else states], how="horizontal")
    history = history_expressions(encounter.collect_schema().names())
    return encounter.select(*ENCOUNTER_NUMERIC_FEATURES, *history, *CATEGORICAL_FEATURES)


def record_features(clean: Mapping[str, Any], state: Mapping[str, int] | None = None) -> dict[str, float | str]:
    """One clean encounter (`cleaning.clean_record`) and its patient's `history.STATE` (None: none known) → its
    feature values, by the rules of `build_features` and `history`.

    Numbers become floats, categories text with `MISSING_CATEGORY` for a missing value, as in the table.
    """
    values: dict[str, float | str] = {}
    for name in ENCOUNTER_NUMERIC_FEATURES:
        value = DERIVED[name].of(clean) if name in DERIVED else clean[name]
        values[name] = float("nan") if value is None else float(value)
    values |= record_history(state, values)
    for name in CATEGORICAL_FEATURES:
        value = clean[name]
        values[name] = MISSING_CATEGORY if value is None else str(value)
    return values
