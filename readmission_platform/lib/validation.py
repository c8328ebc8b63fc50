"""Which clean values break the schema's declared types, enumerations and ranges."""

from __future__ import annotations

from collections.abc import Mapping
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


# Every rule of every clean column, built once: "null:<column>" for a required column, "value:<column>" for its values.
_RULES = {
    **{f"null:{c.name}": pl.col(c.name).is_null() for c in schema.CLEAN_COLUMNS if not c.nullable},
    **{f"value:{c.name}": rule for c in schema.CLEAN_COLUMNS if (rule := _offending(c)) is not None},
}
_COUNTS = [rule.sum().alias(name) for name, rule in _RULES.items()]


def clean_violations(frame: pl.DataFrame) -> list[Violation]:
    """Every column whose values the schema does not allow, with counts and examples."""
    counting = [count for count in _COUNTS if count.meta.output_name().split(":", 1)[1] in frame.columns]
    # One pass counts every rule's rows; only a rule that some rows break is looked at row by row.
    counts = frame.select(counting).row(0, named=True) if counting else {}
    found = []
    for column in schema.CLEAN_COLUMNS:
        if column.name not in frame.columns:
            found.append(Violation(column.name, frame.height, f"column '{column.name}' is missing"))
            continue
        if counts.get(f"null:{column.name}"):
            nulls = frame.filter(_RULES[f"null:{column.name}"])
            found.append(
                Violation(
                    column.name,
                    nulls.height,
                    f"column '{column.name}' is empty or unreadable in {nulls.height} rows "
                    f"(encounter_id {examples(nulls['encounter_id'])}); expected {schema.expected_values(column)}",
                )
            )
        if counts.get(f"value:{column.name}"):
            bad = frame.filter(_RULES[f"value:{column.name}"])
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


def shape_problems(table: str, declared: Mapping[str, pl.DataType], frame: pl.DataFrame, batch_id: str) -> list[str]:
    """What is wrong with the shape of a batch's rows of `table`: other columns than declared, in another order or of
    other types; no rows."""
    problems = []
    if frame.schema != pl.Schema(declared):
        missing = [c for c in declared if c not in frame.schema]
        extra = [c for c in frame.columns if c not in declared]
        retyped = [
            f"{c} {frame.schema[c]} (declared {t})" for c, t in declared.items() if c in frame.schema and frame.schema[c] != t
        ]
        if missing or extra:
            problems.append(f"{table} columns differ from the declared ones: missing {missing}, unexpected {extra}")
        elif retyped:
            problems.append(f"{table} columns have other types than declared: {', '.join(retyped)}")
        else:
            problems.append(f"{table} columns are in another order than declared: {frame.columns}")
    if not frame.height:
        problems.append(f"batch {batch_id} has no rows in {table}")
    return problems


def duplicate_ids(rows: pl.DataFrame, stored_elsewhere: pl.DataFrame) -> list[str]:
    """The encounter_id values of a batch's raw rows that repeat among them or are stored by other batches, each as
    'id (in batch, batch, …)', in id order. `stored_elsewhere` holds (encounter_id, batch_id) of the other batches."""
    ours = rows.select(pl.col("encounter_id").cast(pl.Int64, strict=False), schema.BATCH_ID)
    theirs = stored_elsewhere.select(pl.col("encounter_id").cast(pl.Int64), schema.BATCH_ID)
    repeated = pl.concat(
        [ours.filter(pl.col("encounter_id").is_duplicated()), theirs.join(ours, on="encounter_id", how="semi")]
    ).select("encounter_id")
    if not repeated.height:
        return []
    every = pl.concat([ours, theirs]).join(repeated.unique(), on="encounter_id", how="semi")
    grouped = every.group_by("encounter_id").agg(pl.col(schema.BATCH_ID).sort().str.join(", ").alias("batches"))
    return [f"{row['encounter_id']} (in {row['batches']})" for row in grouped.sort("encounter_id").iter_rows(named=True)]
