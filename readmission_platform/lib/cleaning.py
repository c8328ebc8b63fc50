"""Raw text rows → typed clean rows, and the clinical exclusions."""

from __future__ import annotations

from dataclasses import dataclass

import polars as pl

from readmission_platform.lib import schema


def icd9_group(code: pl.Expr) -> pl.Expr:
    """Map an ICD-9 code to the chapter groups of Strack et al. (2014); null stays null."""
    number = code.cast(pl.Float64, strict=False)
    whole = number.floor()

    def within(lo: int, hi: int) -> pl.Expr:
        return (whole >= lo) & (whole <= hi)

    return (
        pl.when(code.is_null())
        .then(None)
        .when(number.is_null())  # V and E codes
        .then(pl.lit("other"))
        .when(within(390, 459) | (whole == 785))
        .then(pl.lit("circulatory"))
        .when(within(460, 519) | (whole == 786))
        .then(pl.lit("respiratory"))
        .when(within(520, 579) | (whole == 787))
        .then(pl.lit("digestive"))
        .when(whole == 250)
        .then(pl.lit("diabetes"))
        .when(within(800, 999))
        .then(pl.lit("injury"))
        .when(within(710, 739))
        .then(pl.lit("musculoskeletal"))
        .when(within(580, 629) | (whole == 788))
        .then(pl.lit("genitourinary"))
        .when(within(140, 239))
        .then(pl.lit("neoplasms"))
        .otherwise(pl.lit("other"))
    )


def age_years(bracket: pl.Expr) -> pl.Expr:
    """'[70-80)' → 75, the middle of the bracket; an unknown bracket gives null."""
    middles = {b: int(b[1:-1].split("-")[0]) + 5 for b in schema.AGE_BRACKETS}
    return bracket.replace_strict(middles, default=None, return_dtype=pl.Int16)


def _typed(column: schema.Column) -> pl.Expr:
    value = pl.col(column.name).str.strip_chars()
    if column.name in ("A1Cresult", "max_glu_serum"):
        # The data set writes "None" for a test not taken: a category, not a missing value.
        value = pl.when(value == "None").then(pl.lit(schema.NOT_MEASURED)).otherwise(value)
    if column.dtype != pl.String():
        value = value.cast(column.dtype, strict=False)
    return value.alias(column.name)


@dataclass(frozen=True)
class CleanResult:
    frame: pl.DataFrame
    dropped: dict[str, int]


def clean(raw: pl.DataFrame) -> CleanResult:
    """Type the raw text columns, derive age, ICD-9 groups and the label, and drop the exclusions.

    Values that do not parse become null and values outside the schema are kept as they are,
    so the clean asset checks can show them; only the clinical exclusions remove rows.
    """
    text = raw.select(
        schema.BATCH_ID,
        *(
            pl.when(pl.col(name) == schema.MISSING).then(None).otherwise(pl.col(name)).alias(name)
            for name in schema.RAW_COLUMNS
        ),
    )
    derived = {
        "age_years": age_years(pl.col("age")),
        **{f"diag_{i}_group": icd9_group(pl.col(f"diag_{i}")) for i in (1, 2, 3)},
        schema.LABEL_30D: pl.col(schema.LABEL) == "<30",
    }
    typed = text.with_columns(_typed(schema.CLEAN_BY_NAME[n]) for n in schema.RAW_COLUMNS)
    frame = typed.with_columns(**derived).select(list(schema.CLEAN_SCHEMA))

    death_or_hospice = (
        pl.col("discharge_disposition_id").is_in(schema.DEATH_OR_HOSPICE_DISPOSITIONS).fill_null(False)
    )
    invalid_gender = (pl.col("gender") == schema.INVALID_GENDER).fill_null(False) & ~death_or_hospice
    dropped = frame.select(
        death_or_hospice=death_or_hospice.sum(), invalid_gender=invalid_gender.sum()
    ).row(0, named=True)
    kept = frame.filter(~death_or_hospice & ~invalid_gender)
    return CleanResult(kept, dropped)
