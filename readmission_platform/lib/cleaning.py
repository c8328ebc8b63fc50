"""Raw text rows → typed clean rows, and the clinical exclusions."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import polars as pl

from readmission_platform.lib import schema


def _group_of_whole(whole: int) -> str:
    """The group of an ICD-9 code's whole part, by the first rule of `schema.ICD9_RULES` that matches."""
    for group, ranges, singles in schema.ICD9_RULES:
        if whole in singles or any(lo <= whole <= hi for lo, hi in ranges):
            return group
    return schema.ICD9_OTHER


# Every whole part a rule can match, so a code maps by one lookup instead of a rule at a time.
_WHOLE_GROUPS = {float(whole): _group_of_whole(whole) for whole in range(1000)}


def icd9_group(code: pl.Expr) -> pl.Expr:
    """Map a column of ICD-9 codes to the groups of `schema.ICD9_RULES`; null stays null, V and E codes are 'other'."""
    whole = code.cast(pl.Float64, strict=False).floor()
    grouped = whole.replace_strict(_WHOLE_GROUPS, default=pl.lit(schema.ICD9_OTHER), return_dtype=pl.String)
    return pl.when(code.is_null()).then(None).otherwise(grouped)


def icd9_group_of(code: str | None) -> str | None:
    """`icd9_group` for one code, by the same rules: the serving path's single encounter."""
    if code is None:
        return None
    try:
        whole = math.floor(float(code))
    except ValueError:  # V and E codes
        return schema.ICD9_OTHER
    group = _WHOLE_GROUPS.get(whole)  # an int finds its float key
    return group if group is not None else _group_of_whole(whole)


def age_years(bracket: pl.Expr) -> pl.Expr:
    """'[70-80)' → 75, the middle of the bracket; an unknown bracket gives null."""
    return bracket.replace_strict(schema.AGE_MIDDLES, default=None, return_dtype=pl.Int16)


def _typed(column: schema.Column, text: pl.Expr, *, strip: bool = True) -> pl.Expr:
    value = text.str.strip_chars() if strip else text
    if column.name in schema.NOT_MEASURED_COLUMNS:
        value = pl.when(value == schema.NOT_TAKEN).then(pl.lit(schema.NOT_MEASURED)).otherwise(value)
    if column.dtype != pl.String():
        value = value.cast(column.dtype, strict=False)
    return value.alias(column.name)


def raw_value(name: str) -> pl.Expr:
    """A raw text column read as its clean column types it: stripped, '?' and a value not of its type null."""
    return _typed(schema.CLEAN_BY_NAME[name], _present(name))


@dataclass(frozen=True)
class CleanResult:
    frame: pl.DataFrame
    dropped: dict[str, int]


def _present(name: str) -> pl.Expr:
    """A raw text column with the data set's '?' as null."""
    return pl.when(pl.col(name) == schema.MISSING).then(None).otherwise(pl.col(name)).alias(name)


def _readmitted_30d(label: pl.Expr) -> pl.Expr:
    return label == schema.READMITTED_WITHIN_30_DAYS


# How a derived column comes from the raw column the schema derives it from (`Column.derived_from`).
_DERIVATIONS: dict[str, Callable[[pl.Expr], pl.Expr]] = {
    "age": age_years,
    **{f"diag_{i}": icd9_group for i in (1, 2, 3)},
    schema.LABEL: _readmitted_30d,
}
# The same for one encounter's value, on the serving path (which has no label).
_DERIVATIONS_OF_ONE: dict[str, Callable[[object], object]] = {
    "age": schema.AGE_MIDDLES.get,
    **{f"diag_{i}": icd9_group_of for i in (1, 2, 3)},
}


def _clean_column(column: schema.Column, value: Callable[[str], pl.Expr], *, strip: bool) -> pl.Expr:
    if column.derived_from is not None:
        return _DERIVATIONS[column.derived_from](value(column.derived_from))
    return _typed(column, value(column.name), strip=strip)


def _clean_columns(names: Sequence[str], value: Callable[[str], pl.Expr], *, strip: bool) -> list[pl.Expr]:
    """Each named clean column, from the source column `value(name)` gives: typed, or derived."""
    return [_clean_column(schema.CLEAN_BY_NAME[name], value, strip=strip).alias(name) for name in names]


# Built once: every clean column from the raw text columns, in CLEAN_SCHEMA order.
_CLEAN = [pl.col(schema.BATCH_ID), *_clean_columns([n for n in schema.CLEAN_SCHEMA if n != schema.BATCH_ID], _present, strip=True)]
# The clean columns of a validated request: typed already, null where unknown, no identifier and no label.
REQUEST_CLEAN_COLUMNS = tuple(
    n for n in schema.CLEAN_SCHEMA if n not in (schema.BATCH_ID, *schema.IDENTIFIERS, schema.LABEL, schema.LABEL_30D)
)
_REQUEST = _clean_columns(REQUEST_CLEAN_COLUMNS, pl.col, strip=False)
_REQUEST_DERIVED = tuple(name for name in REQUEST_CLEAN_COLUMNS if name in schema.DERIVED)
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
    for name in schema.NOT_MEASURED_COLUMNS:
        if row.get(name) == schema.NOT_TAKEN:
            row[name] = schema.NOT_MEASURED
    for name in _REQUEST_DERIVED:
        source = schema.CLEAN_BY_NAME[name].derived_from
        row[name] = _DERIVATIONS_OF_ONE[source](row.get(source))
    return row
