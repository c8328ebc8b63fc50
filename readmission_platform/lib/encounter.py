"""The serving request: one encounter as the hospital system records it, derived from `schema`.

Fields are the data set's columns without identifiers and label, spelt as the data set spells them
(`A1Cresult`, `glyburide-metformin`), with the values the hospital system writes: age brackets, ICD-9 codes,
medication statuses, "None" for a lab test not taken. Columns the data allows to be unknown ('?' in the file) may
be null or absent; every other one is required. Extra fields are refused, so no identifier can reach the log.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Annotated, Any, Literal

import polars as pl
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StrictInt, StringConstraints, create_model

from readmission_platform.lib import schema
from readmission_platform.lib.cleaning import NOT_MEASURED_COLUMNS, NOT_TAKEN, clean
from readmission_platform.lib.features import build_features

REQUEST_ID = "request_id"
FIELDS: tuple[str, ...] = tuple(n for n in schema.RAW_COLUMNS if n not in schema.IDENTIFIERS and n != schema.LABEL)
MAX_TEXT = 100


def _not_death_or_hospice(value: int) -> int:
    if value in schema.DEATH_OR_HOSPICE_DISPOSITIONS:
        raise ValueError(
            f"discharge disposition {value} means the patient died or went to hospice "
            f"({', '.join(map(str, schema.DEATH_OR_HOSPICE_DISPOSITIONS))}); no readmission risk is predicted for them"
        )
    return value


def _annotation(column: schema.Column) -> Any:
    if column.allowed is not None:
        allowed = tuple(NOT_TAKEN if v == schema.NOT_MEASURED else v for v in column.allowed)
        typ: Any = Literal[allowed]  # type: ignore[valid-type]
        if column.name == "discharge_disposition_id":
            typ = Annotated[typ, AfterValidator(_not_death_or_hospice)]
    elif column.range is not None:
        typ = Annotated[StrictInt, Field(ge=column.range[0], le=column.range[1])]
    elif column.pattern is not None:
        typ = Annotated[str, StringConstraints(pattern=column.pattern.pattern)]
    else:
        typ = Annotated[str, StringConstraints(min_length=1, max_length=MAX_TEXT)]
    return typ | None if column.nullable else typ


def _attribute(name: str) -> str:
    return name.replace("-", "_")


def _field(name: str) -> tuple[Any, Any]:
    column = schema.CLEAN_BY_NAME[name]
    default = None if column.nullable else ...
    described = column.description or (
        f"{name}: {schema.expected_values(column)}".replace(schema.NOT_MEASURED, NOT_TAKEN)
        if name not in NOT_MEASURED_COLUMNS
        else f"{name}: {NOT_TAKEN} (not measured), or the result"
    )
    return _annotation(column), Field(default, alias=name, description=described)


Encounter: type[BaseModel] = create_model(
    "Encounter",
    __config__=ConfigDict(extra="forbid", title="Encounter"),
    __doc__="One encounter as the hospital system records it, without patient identifiers.",
    **{_attribute(name): _field(name) for name in FIELDS},
    request_id=(
        Annotated[str, StringConstraints(min_length=1, max_length=128)] | None,
        Field(None, description="The client's id for this request, echoed in the answer and the prediction log."),
    ),
)
_ATTRIBUTES = tuple((_attribute(name), name) for name in FIELDS)
# Validated values are ints for the integer columns and text for the rest.
_REQUEST_DTYPES = {name: pl.Int64() if schema.CLEAN_BY_NAME[name].dtype.is_integer() else pl.String() for name in FIELDS}


def record(encounter: BaseModel) -> dict[str, Any]:
    """A validated encounter as {data set column: value}, None where unknown."""
    return {name: getattr(encounter, attribute) for attribute, name in _ATTRIBUTES}


def columns(encounters: Sequence[BaseModel]) -> dict[str, list[Any]]:
    """Validated encounters as {data set column: values}, None where unknown."""
    return {name: [getattr(e, attribute) for e in encounters] for attribute, name in _ATTRIBUTES}


def typed_frame(values: Mapping[str, list[Any]] | Sequence[Mapping[str, Any]]) -> pl.DataFrame:
    """Validated encounters (columns, or records as `record` gives them) as a frame: integers and text, null if unknown."""
    if not isinstance(values, Mapping):
        values = {name: [e[name] for e in values] for name in FIELDS}
    return pl.DataFrame({name: pl.Series(name, values[name], _REQUEST_DTYPES[name], strict=False) for name in FIELDS})


def raw_frame(typed: pl.DataFrame) -> pl.DataFrame:
    """A `typed_frame` as the text columns of a raw batch ('?' for unknown), for `cleaning.clean`."""
    return typed.select(pl.col(name).cast(pl.String).fill_null(schema.MISSING) for name in FIELDS)


def features_frame(values: Mapping[str, list[Any]] | Sequence[Mapping[str, Any]] | pl.DataFrame) -> pl.DataFrame:
    """Validated encounters → their rows of the features table, through the batch pipeline's `clean` and
    `build_features` (placeholder identifiers, no label). Every row is kept: validation refuses the exclusions."""
    typed = values if isinstance(values, pl.DataFrame) else typed_frame(values)
    n = typed.height
    frame = raw_frame(typed).with_columns(
        pl.int_range(1, n + 1).cast(pl.String).alias(schema.IDENTIFIERS[0]),
        pl.int_range(1, n + 1).cast(pl.String).alias(schema.IDENTIFIERS[1]),
        pl.lit(schema.MISSING).alias(schema.LABEL),
        pl.lit("request").alias(schema.BATCH_ID),
    )
    result = clean(frame)
    if result.frame.height != n:
        raise ValueError(f"cleaning dropped {result.dropped} of {n} encounters; validate them first")
    return build_features(result.frame)


def from_clean(row: dict[str, Any]) -> dict[str, Any]:
    """A row of the clean table → the request a hospital system would send for it (identifiers and label left out)."""
    return {
        name: NOT_TAKEN if name in NOT_MEASURED_COLUMNS and row[name] == schema.NOT_MEASURED else row[name]
        for name in FIELDS
    }
