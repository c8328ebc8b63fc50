"""Which clean values break the schema's declared types, enumerations and ranges."""

from __future__ import annotations

from dataclasses import dataclass

import polars as pl

from readmission_platform.lib import schema
from readmission_platform.lib.reporting import examples


@dataclass(frozen=True)
class Violation:
    column: str
    rows: int
    message: str


def _offending(column: schema.Column) -> pl.Expr | None:
    value = pl.col(column.name)
    if column.allowed is not None:
        return value.is_not_null() & ~value.is_in(column.allowed)
    if column.range is not None:
        return value.is_not_null() & ~value.is_between(*column.range)
    if column.pattern is not None:
        return value.is_not_null() & ~value.str.contains(column.pattern.pattern)
    return None


def clean_violations(frame: pl.DataFrame) -> list[Violation]:
    """Every column whose values the schema does not allow, with counts and examples."""
    found = []
    for column in schema.CLEAN_COLUMNS:
        if column.name not in frame.columns:
            found.append(Violation(column.name, frame.height, f"column '{column.name}' is missing"))
            continue
        if not column.nullable:
            nulls = frame.filter(pl.col(column.name).is_null())
            if nulls.height:
                found.append(
                    Violation(
                        column.name,
                        nulls.height,
                        f"column '{column.name}' is empty or unreadable in {nulls.height} rows "
                        f"(encounter_id {examples(nulls['encounter_id'])}); expected {schema.expected_values(column)}",
                    )
                )
        offending = _offending(column)
        if offending is None:
            continue
        bad = frame.filter(offending)
        if bad.height:
            values = bad[column.name].unique(maintain_order=True)
            found.append(
                Violation(
                    column.name,
                    bad.height,
                    f"column '{column.name}' holds {examples(repr(v) for v in values)} in {bad.height} rows "
                    f"(encounter_id {examples(bad['encounter_id'])}); expected {schema.expected_values(column)}",
                )
            )
    return found
