"""The model-ready feature table, computed from clean rows the same way for training and serving."""

from __future__ import annotations

import polars as pl

from readmission_platform.lib import schema

# Constant or nearly constant over the data set (at most 3 rows differ from "No"): no signal.
UNINFORMATIVE_MEDICATIONS = ("examide", "citoglipton", "acetohexamide", "troglitazone", "metformin-rosiglitazone")
MEDICATION_FEATURES = tuple(m for m in schema.MEDICATIONS if m not in UNINFORMATIVE_MEDICATIONS)
MISSING_CATEGORY = "missing"

NUMERIC_FEATURES = (
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
FEATURE_COLUMNS = NUMERIC_FEATURES + CATEGORICAL_FEATURES
LINEAGE_COLUMNS = (*schema.IDENTIFIERS, schema.BATCH_ID)
LABEL_COLUMNS = (schema.LABEL_30D, schema.LABEL)

FEATURE_SCHEMA: dict[str, pl.DataType] = (
    {name: pl.Int64() for name in schema.IDENTIFIERS}
    | {schema.BATCH_ID: pl.String(), schema.LABEL_30D: pl.Boolean(), schema.LABEL: pl.String()}
    | {name: pl.Float64() for name in NUMERIC_FEATURES}
    | {name: pl.String() for name in CATEGORICAL_FEATURES}
)


def _feature_expressions() -> list[pl.Expr]:
    medications = [pl.col(m) for m in MEDICATION_FEATURES]
    derived = {
        "prior_visits": pl.col("number_outpatient") + pl.col("number_emergency") + pl.col("number_inpatient"),
        "medications_prescribed": pl.sum_horizontal(m != "No" for m in medications),
        "medication_changes": pl.sum_horizontal(m.is_in(("Up", "Down")) for m in medications),
        "weight_recorded": pl.col("weight").is_not_null(),
    }
    numeric = [
        (derived[name] if name in derived else pl.col(name)).cast(pl.Float64).alias(name) for name in NUMERIC_FEATURES
    ]
    categorical = [pl.col(name).cast(pl.String).fill_null(MISSING_CATEGORY).alias(name) for name in CATEGORICAL_FEATURES]
    return numeric + categorical


def build_features(clean: pl.DataFrame) -> pl.DataFrame:
    """Clean rows → identifiers, labels and the declared feature columns, in `FEATURE_SCHEMA` order."""
    return clean.select(*LINEAGE_COLUMNS, *LABEL_COLUMNS, *_feature_expressions()).select(list(FEATURE_SCHEMA))
