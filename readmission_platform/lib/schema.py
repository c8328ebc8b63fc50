"""The one description of the data: raw columns, typed clean columns, enumerations and ranges.

Ingestion, cleaning, features, asset checks and the serving request model all read it from here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import polars as pl

MISSING = "?"
# The data set writes "None" for a lab test not taken: a category of its own, not a missing value.
NOT_TAKEN = "None"
NOT_MEASURED = "not measured"
NOT_MEASURED_COLUMNS = ("A1Cresult", "max_glu_serum")

IDENTIFIERS = ("encounter_id", "patient_nbr")
LABEL = "readmitted"
LABEL_30D = "readmitted_30d"
READMITTED_WITHIN_30_DAYS = "<30"

AGE_BRACKETS = tuple(f"[{lo}-{lo + 10})" for lo in range(0, 100, 10))
# '[70-80)' → 75, the middle of the bracket.
AGE_MIDDLES = {bracket: int(bracket[1:-1].split("-")[0]) + 5 for bracket in AGE_BRACKETS}
WEIGHT_BRACKETS = (
    "[0-25)", "[25-50)", "[50-75)", "[75-100)", "[100-125)",
    "[125-150)", "[150-175)", "[175-200)", ">200",
)  # fmt: skip
MEDICATION_STATUSES = ("No", "Steady", "Up", "Down")
MEDICATIONS = (
    "metformin", "repaglinide", "nateglinide", "chlorpropamide", "glimepiride",
    "acetohexamide", "glipizide", "glyburide", "tolbutamide", "pioglitazone",
    "rosiglitazone", "acarbose", "miglitol", "troglitazone", "tolazamide",
    "examide", "citoglipton", "insulin", "glyburide-metformin", "glipizide-metformin",
    "glimepiride-pioglitazone", "metformin-rosiglitazone", "metformin-pioglitazone",
)  # fmt: skip

# Codes of IDs_mapping.csv; 26 and 30 are listed there although the 1999-2008 data never uses them.
ADMISSION_TYPE_IDS = tuple(range(1, 9))
DISCHARGE_DISPOSITION_IDS = tuple(range(1, 31))
ADMISSION_SOURCE_IDS = (*range(1, 16), *range(17, 27))

# Discharges after which a readmission is impossible: expired (11, 19, 20, 21) or hospice (13, 14).
DEATH_OR_HOSPICE_DISPOSITIONS = (11, 13, 14, 19, 20, 21)
INVALID_GENDER = "Unknown/Invalid"

# ICD-9 as the data set writes it: leading zeros dropped ("8", "42"), V and E codes kept.
ICD9_PATTERN = re.compile(r"^(\d{1,3}(\.\d{1,2})?|V\d{1,2}(\.\d{1,2})?|E\d{3}(\.\d{1,2})?)$")
# The ICD-9 chapter groups of Strack et al. (2014): (group, ranges of the code's whole part, single whole codes).
# The first matching rule wins; V and E codes, and numbers no rule covers, are 'other'.
ICD9_RULES: tuple[tuple[str, tuple[tuple[int, int], ...], tuple[int, ...]], ...] = (
    ("circulatory", ((390, 459),), (785,)),
    ("respiratory", ((460, 519),), (786,)),
    ("digestive", ((520, 579),), (787,)),
    ("diabetes", (), (250,)),
    ("injury", ((800, 999),), ()),
    ("musculoskeletal", ((710, 739),), ()),
    ("genitourinary", ((580, 629),), (788,)),
    ("neoplasms", ((140, 239),), ()),
)
ICD9_OTHER = "other"
ICD9_GROUPS = (*(group for group, _, _ in ICD9_RULES), ICD9_OTHER)


@dataclass(frozen=True)
class Column:
    """A clean column: its type, whether it may be null, and the values it may hold."""

    name: str
    dtype: pl.DataType
    nullable: bool = False
    allowed: tuple | None = None
    range: tuple[int, int] | None = None
    pattern: re.Pattern | None = None
    description: str = ""
    derived_from: str | None = None  # the raw column `cleaning` computes it from; None: typed from its own raw column


def _category(name: str, allowed: tuple, nullable: bool = False, description: str = "", **more) -> Column:
    return Column(name, pl.String(), nullable=nullable, allowed=allowed, description=description, **more)


def _count(name: str, lo: int, hi: int, description: str) -> Column:
    return Column(name, pl.Int16(), range=(lo, hi), description=description)


CLEAN_COLUMNS: tuple[Column, ...] = (
    Column("encounter_id", pl.Int64(), range=(1, 2**63 - 1), description="encounter identifier"),
    Column("patient_nbr", pl.Int64(), range=(1, 2**63 - 1), description="patient identifier"),
    _category("race", ("Caucasian", "AfricanAmerican", "Hispanic", "Asian", "Other"), nullable=True),
    _category("gender", ("Female", "Male")),
    _category("age", AGE_BRACKETS, description="age bracket as recorded"),
    Column("age_years", pl.Int16(), range=(5, 95), description="middle of the age bracket", derived_from="age"),
    _category("weight", WEIGHT_BRACKETS, nullable=True, description="weight bracket in pounds"),
    Column("admission_type_id", pl.Int16(), allowed=ADMISSION_TYPE_IDS),
    Column("discharge_disposition_id", pl.Int16(), allowed=DISCHARGE_DISPOSITION_IDS),
    Column("admission_source_id", pl.Int16(), allowed=ADMISSION_SOURCE_IDS),
    _count("time_in_hospital", 1, 14, "days between admission and discharge"),
    Column("payer_code", pl.String(), nullable=True, pattern=re.compile(r"^[A-Z]{2}$")),
    Column("medical_specialty", pl.String(), nullable=True, description="admitting physician's specialty"),
    _count("num_lab_procedures", 0, 300, "lab tests during the encounter"),
    _count("num_procedures", 0, 50, "procedures other than lab tests"),
    _count("num_medications", 0, 300, "distinct generic drugs administered"),
    _count("number_outpatient", 0, 365, "outpatient visits in the preceding year"),
    _count("number_emergency", 0, 365, "emergency visits in the preceding year"),
    _count("number_inpatient", 0, 365, "inpatient visits in the preceding year"),
    *(
        column
        for i in (1, 2, 3)
        for column in (
            Column(f"diag_{i}", pl.String(), nullable=True, pattern=ICD9_PATTERN, description="ICD-9 code"),
            _category(
                f"diag_{i}_group", ICD9_GROUPS, nullable=True, description="ICD-9 chapter group", derived_from=f"diag_{i}"
            ),
        )
    ),
    _count("number_diagnoses", 1, 50, "diagnoses entered"),
    _category("max_glu_serum", (NOT_MEASURED, "Norm", ">200", ">300")),
    _category("A1Cresult", (NOT_MEASURED, "Norm", ">7", ">8")),
    *(_category(name, MEDICATION_STATUSES) for name in MEDICATIONS),
    _category("change", ("No", "Ch"), description="a diabetes medication was changed"),
    _category("diabetesMed", ("No", "Yes"), description="a diabetes medication was prescribed"),
    _category(LABEL, ("NO", ">30", "<30"), description="readmission: never, after 30 days, within 30 days"),
    Column(LABEL_30D, pl.Boolean(), description="readmitted within 30 days", derived_from=LABEL),
)
CLEAN_BY_NAME = {column.name: column for column in CLEAN_COLUMNS}

# The file as the hospital system exports it: every column of the clean table that is not derived.
DERIVED = frozenset(c.name for c in CLEAN_COLUMNS if c.derived_from is not None)
RAW_COLUMNS: tuple[str, ...] = tuple(c.name for c in CLEAN_COLUMNS if c.name not in DERIVED)

# Columns the warehouse adds to every table. batch_id, the partition key, comes first: PostgreSQL reads a row's
# columns in order, so a filter on batch_id then costs one column, not all fifty before it.
BATCH_ID = "batch_id"
RAW_LINEAGE = {
    "source_file": pl.String(),
    "line_number": pl.Int64(),
    "row_hash": pl.String(),
    "ingested_at": pl.Datetime("us", "UTC"),
}
RAW_SCHEMA: dict[str, pl.DataType] = {BATCH_ID: pl.String()} | {name: pl.String() for name in RAW_COLUMNS} | RAW_LINEAGE
CLEAN_SCHEMA: dict[str, pl.DataType] = {BATCH_ID: pl.String()} | {c.name: c.dtype for c in CLEAN_COLUMNS}
REJECTED_SCHEMA: dict[str, pl.DataType] = {
    BATCH_ID: pl.String(),
    "source_file": pl.String(),
    "line_number": pl.Int64(),
    "encounter_id": pl.String(),
    "reason": pl.String(),
    "raw_line": pl.String(),
    "rejected_at": pl.Datetime("us", "UTC"),
}

BATCH_ID_PATTERN = re.compile(r"^[A-Za-z0-9_.-]+$")


def expected_values(column: Column) -> str:
    """Say in words what a column may hold, for error messages."""
    if column.allowed is not None:
        return "one of " + ", ".join(map(str, column.allowed))
    if column.range is not None:
        return f"an integer from {column.range[0]} to {column.range[1]}"
    if column.pattern is not None:
        return f"text matching {column.pattern.pattern}"
    return "text"
