"""Raw text rows → typed clean rows, and the clinical exclusions."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import polars as pl

from readmission_platform.lib import schema

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
# '[70-80)' → 75, the middle of the bracket.
AGE_MIDDLES = {bracket: int(bracket[1:-1].split("-")[0]) + 5 for bracket in schema.AGE_BRACKETS}
# The data set writes "None" for a test not taken: a category, not a missing value.
NOT_MEASURED_COLUMNS = ("A1Cresult", "max_glu_serum")
NOT_TAKEN = "None"


def _group_of_whole(whole: int) -> str:
    """The group of an ICD-9 code's whole part, by the first rule of `ICD9_RULES` that matches."""
    for group, ranges, singles in ICD9_RULES:
        if whole in singles or any(lo <= whole <= hi for lo, hi in ranges):
            return group
    return ICD9_OTHER


# Every whole part a rule can match, so a column maps by one lookup instead of a rule at a time.
_WHOLE_GROUPS = {float(whole): _group_of_whole(whole) for whole in range(1000)}


def icd9_group(code: pl.Expr) -> pl.Expr:
    """Map a column of ICD-9 codes to the groups of `ICD9_RULES`; null stays null, V and E codes are 'other'."""
    whole = code.cast(pl.Float64, strict=False).floor()
    grouped = whole.replace_strict(_WHOLE_GROUPS, default=pl.lit(ICD9_OTHER), return_dtype=pl.String)
    return pl.when(code.is_null()).then(None).otherwise(grouped)


def icd9_group_of(code: str | None) -> str | None:
    """`icd9_group` for one code, by the same rules: the serving path's single encounter."""
    if code is None:
        return None
    try:
        whole = math.floor(float(code))
    except ValueError:  # V and E codes
        return ICD9_OTHER
    return _group_of_whole(whole)


def age_years(bracket: pl.Expr) -> pl.Expr:
    """'[70-80)' → 75, the middle of the bracket; an unknown bracket gives null."""
    return bracket.replace_strict(AGE_MIDDLES, default=None, return_dtype=pl.Int16)


def _typed(column: schema.Column, text: pl.Expr, *, strip: bool = True) -> pl.Expr:
    value = text.str.strip_chars() if strip else text
    if column.name in NOT_MEASURED_COLUMNS:
        value = pl.when(value == NOT_TAKEN).then(pl.lit(schema.NOT_MEASURED)).otherwise(value)
    if column.dtype != pl.String():
        value = value.cast(column.dtype, strict=False)
    return value.alias(column.name)


@dataclass(frozen=True)
class CleanResult:
    frame: pl.DataFrame
    dropped: dict[str, int]


def _present(name: str) -> pl.Expr:
    """A raw text column with the data set's '?' as null."""
    return pl.when(pl.col(name) == schema.MISSING).then(None).otherwise(pl.col(name)).alias(name)


def _clean_columns(names: Sequence[str], value: Callable[[str], pl.Expr], *, strip: bool) -> list[pl.Expr]:
    """Each named clean column, from the source column `value(name)` gives: typed, or derived."""
    derived = {
        "age_years": lambda: age_years(value("age")),
        **{f"diag_{i}_group": (lambda i=i: icd9_group(value(f"diag_{i}"))) for i in (1, 2, 3)},
        schema.LABEL_30D: lambda: value(schema.LABEL) == "<30",
    }
    return [
        (derived[name]() if name in derived else _typed(schema.CLEAN_BY_NAME[name], value(name), strip=strip)).alias(name)
        for name in names
    ]


# Built once: every clean column from the raw text columns, in CLEAN_SCHEMA order.
_CLEAN = [pl.col(schema.BATCH_ID), *_clean_columns([n for n in schema.CLEAN_SCHEMA if n != schema.BATCH_ID], _present, strip=True)]
# The clean columns of a validated request: typed already, null where unknown, no identifier and no label.
REQUEST_CLEAN_COLUMNS = tuple(
    n for n in schema.CLEAN_SCHEMA if n not in (schema.BATCH_ID, *schema.IDENTIFIERS, schema.LABEL, schema.LABEL_30D)
)
_REQUEST = _clean_columns(REQUEST_CLEAN_COLUMNS, pl.col, strip=False)
_DEATH_OR_HOSPICE = pl.col("discharge_disposition_id").is_in(schema.DEATH_OR_HOSPICE_DISPOSITIONS).fill_null(False)
_INVALID_GENDER = (pl.col("gender") == schema.INVALID_GENDER).fill_null(False) & ~_DEATH_OR_HOSPICE


def clean(raw: pl.DataFrame) -> CleanResult:
    """Type the raw text columns, derive age, ICD-9 groups and the label, and drop the exclusions.

    Values that do not parse become null and values outside the schema are kept as they are,
    so the clean asset checks can show them; only the clinical exclusions remove rows.
    """
    frame = raw.select(_CLEAN)
    dropped = frame.select(death_or_hospice=_DEATH_OR_HOSPICE.sum(), invalid_gender=_INVALID_GENDER.sum()).row(0, named=True)
    return CleanResult(frame.filter(~_DEATH_OR_HOSPICE & ~_INVALID_GENDER), dropped)


def clean_request(typed: pl.DataFrame) -> pl.DataFrame:
    """Validated encounters as a frame (their typed values, null where unknown) → their clean columns, by the rules of
    `clean`. Validation has refused the exclusions, and its values need no stripping."""
    return typed.select(_REQUEST)


def clean_record(record: Mapping[str, object]) -> dict[str, object]:
    """One encounter already typed (a validated serving request) → its clean values, by the rules of `clean`.

    `record` holds the raw columns other than identifiers and label, missing values as None. The serving path calls
    this instead of `clean` because a one-row polars frame costs milliseconds; the rules are the same tables.
    """
    row = dict(record)
    for name in NOT_MEASURED_COLUMNS:
        if row.get(name) == NOT_TAKEN:
            row[name] = schema.NOT_MEASURED
    row["age_years"] = AGE_MIDDLES.get(row.get("age"))
    for i in (1, 2, 3):
        row[f"diag_{i}_group"] = icd9_group_of(row.get(f"diag_{i}"))
    return row
