"""The serving request: one encounter as the hospital system records it, derived from `schema`.

Fields are the data set's columns without identifiers and label, spelt as the data set spells them
(`A1Cresult`, `glyburide-metformin`), with the values the hospital system writes: age brackets, ICD-9 codes,
medication statuses, "None" for a lab test not taken. Columns the data allows to be unknown ('?' in the file) may
be null or absent; every other one is required. Extra fields are refused, so no identifier can reach the log. The
one identifier a request may carry, `patient_id` (the hospital's patient identifier, for the patient's history), is
no field of the data set: `record` and `columns` leave it out, and the service keeps only its keyed hash.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Annotated, Any, Literal

import polars as pl
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictInt,
    StringConstraints,
    create_model,
)
from pydantic_core import PydanticKnownError

from readmission_platform.lib import schema
from readmission_platform.lib.cleaning import clean_request
from readmission_platform.lib.features import feature_values
from readmission_platform.lib.schema import NOT_MEASURED_COLUMNS, NOT_TAKEN

REQUEST_ID = "request_id"
PATIENT_ID = "patient_id"
MAX_PATIENT_ID = 64
FIELDS: tuple[str, ...] = tuple(n for n in schema.RAW_COLUMNS if n not in schema.IDENTIFIERS and n != schema.LABEL)
MAX_TEXT = 100
MAX_REQUEST_ID = 128
MAX_BATCH = 20_000  # encounters in one batch request
# Printable ASCII only: a request_id is echoed into answers, logs and the prediction log, where a NUL, a line break or
# an ANSI escape would forge or garble lines.
REQUEST_ID_PATTERN = r"^[ -~]+$"
# Why an encounter gets no probability: discharged to death or hospice, after which no readmission can follow.
DEATH_OR_HOSPICE = "death_or_hospice"
# Free text has no space at either end: the training data's text was stripped, so " Surgery" would not be "Surgery".
# Written with the characters Python counts as space but some regex engines do not (\x1c-\x1f, \x85) named, so the
# documented pattern means the same to a client's validator, to hypothesis's generator and to pydantic. No control
# character anywhere: a NUL cannot be stored in PostgreSQL's text, and none is part of a clinical value.
TRIMMED = r"^[^\s\x00-\x1f\x7f\x85](?:[^\x00-\x1f\x7f]*[^\s\x00-\x1f\x7f\x85])?$"


def out_of_scope(disposition: int) -> str:
    """Why no readmission risk is predicted for an encounter with this discharge disposition."""
    return (
        f"discharge disposition {disposition} means the patient died or went to hospice "
        f"({', '.join(map(str, schema.DEATH_OR_HOSPICE_DISPOSITIONS))}); no readmission risk is predicted for them"
    )


def openapi_3_0(model_schema: dict[str, Any]) -> None:
    """A model's fields as OpenAPI 3.0 writes them: `nullable` (null in the enum too), a one-value enum for `const`.

    BentoML's document is an OpenAPI 3.0 one, and keeps only the first branch of pydantic's `anyOf: [..., {"type":
    "null"}]`: the field would be declared not null.
    """
    for field in model_schema["properties"].values():
        branches = field.get("anyOf", ())
        if {"type": "null"} in branches and len(branches) == 2:
            (kept,) = (b for b in branches if b != {"type": "null"})
            del field["anyOf"]
            field.update(kept, nullable=True)
        if "const" in field:
            field["enum"] = [field.pop("const")]
        if field.get("nullable") and "enum" in field:
            field["enum"] = [*field["enum"], None]


def allowed(column: schema.Column) -> tuple:
    """The values a request may give: the clean enumeration, with "None" as the data set writes a test not taken."""
    return tuple(NOT_TAKEN if v == schema.NOT_MEASURED else v for v in column.allowed)


def _whole(value: Any) -> Any:
    """A JSON integer and nothing else: a code's Literal would take true for 1, and 1.0."""
    if type(value) is not int:
        raise PydanticKnownError("int_type")
    return value


def _annotation(column: schema.Column) -> Any:
    if column.allowed is not None:
        typ: Any = Literal[allowed(column)]  # type: ignore[valid-type]
        if all(type(value) is int for value in column.allowed):
            typ = Annotated[typ, BeforeValidator(_whole)]
    elif column.range is not None:
        typ = Annotated[StrictInt, Field(ge=column.range[0], le=column.range[1])]
    elif column.pattern is not None:
        typ = Annotated[str, StringConstraints(pattern=column.pattern.pattern)]
    else:
        typ = Annotated[str, StringConstraints(min_length=1, max_length=MAX_TEXT, pattern=TRIMMED)]
    return typ | None if column.nullable else typ


def attribute(name: str) -> str:
    """The request models' attribute of a data set column (`glyburide-metformin` → `glyburide_metformin`)."""
    return name.replace("-", "_")


def _field(name: str, *, single: bool) -> tuple[Any, Any]:
    column = schema.CLEAN_BY_NAME[name]
    default = None if column.nullable else ...
    described = column.description or (
        f"{name}: {schema.expected_values(column)}".replace(schema.NOT_MEASURED, NOT_TAKEN)
        if name not in NOT_MEASURED_COLUMNS
        else f"{name}: {NOT_TAKEN} (not measured), or the result"
    )
    extra = None
    if name == "discharge_disposition_id":
        deaths = ", ".join(map(str, schema.DEATH_OR_HOSPICE_DISPOSITIONS))
        if single:
            # Declared out of the contract, yet validated as codes: the service answers them 422 with the reason.
            extra = {"enum": [v for v in column.allowed if v not in schema.DEATH_OR_HOSPICE_DISPOSITIONS]}
            described = f"{name}: one of {', '.join(map(str, extra['enum']))}; {deaths} (death or hospice) are " \
                        "answered 422, as no readmission risk is predicted for them"  # fmt: skip
        else:
            described += f"; {deaths} (death or hospice) are answered without a probability (reason '{DEATH_OR_HOSPICE}')"
    return _annotation(column), Field(default, alias=name, description=described, json_schema_extra=extra)


def _encounter_model(title: str, *, single: bool) -> type[BaseModel]:
    return create_model(
        title,
        __config__=ConfigDict(extra="forbid", title=title, json_schema_extra=openapi_3_0),
        __doc__="One encounter as the hospital system records it, without patient identifiers.",
        **{attribute(name): _field(name, single=single) for name in FIELDS},
        request_id=(
            Annotated[str, StringConstraints(min_length=1, max_length=MAX_REQUEST_ID, pattern=REQUEST_ID_PATTERN)] | None,
            Field(None, description="The client's id for this request (printable ASCII), echoed in the answer and the "
                                    "prediction log."),  # fmt: skip
        ),
        patient_id=(
            Annotated[str, StringConstraints(min_length=1, max_length=MAX_PATIENT_ID, pattern=REQUEST_ID_PATTERN)] | None,
            Field(None, description="The hospital's patient identifier (printable ASCII), for the patient's history "
                                    "of earlier encounters; hashed with the service's key at once, never stored or "
                                    "echoed. Absent: the encounter is scored without history."),  # fmt: skip
        ),
    )


# The two differ in their declared schema only: one encounter out of scope is answered 422, one in a batch per item.
Encounter = _encounter_model("Encounter", single=True)
BatchEncounter = _encounter_model("BatchEncounter", single=False)
_ATTRIBUTES = tuple((attribute(name), name) for name in FIELDS)
# Validated values are ints for the integer columns and text for the rest.
REQUEST_DTYPES = {name: pl.Int64() if schema.CLEAN_BY_NAME[name].dtype.is_integer() else pl.String() for name in FIELDS}

BatchRequest: type[BaseModel] = create_model(
    "BatchRequest",
    __config__=ConfigDict(extra="forbid", title="BatchRequest"),
    __doc__="Many encounters, answered in the order sent, all by one model version.",
    encounters=(list[BatchEncounter], Field(min_length=1, max_length=MAX_BATCH)),
)


def _largest_encounter() -> dict[str, Any]:
    """An encounter with every field at its longest: the longest allowed value or bound, text at MAX_TEXT characters."""

    def longest(column: schema.Column) -> Any:
        if column.allowed is not None:
            return max(allowed(column), key=lambda v: len(json.dumps(v)))
        if column.range is not None:
            return max(column.range, key=lambda v: len(str(v)))
        return "x" * MAX_TEXT

    return {
        **{name: longest(schema.CLEAN_BY_NAME[name]) for name in FIELDS},
        REQUEST_ID: "x" * MAX_REQUEST_ID,
        PATIENT_ID: "x" * MAX_PATIENT_ID,
    }


_LARGEST_ENCOUNTER_BYTES = len(json.dumps(_largest_encounter(), separators=(",", ":")))  # in compact JSON
# The body a batch request may have: MAX_BATCH of the largest encounters in compact JSON, twice over for indentation
# and escaped characters.
MAX_BATCH_BYTES = 2 * (len('{"encounters":[]}') + MAX_BATCH * (_LARGEST_ENCOUNTER_BYTES + 1))
# The body one encounter may have (/predict, /explain): the largest, eight times over (every character of its text
# escaped as \uXXXX, and indentation). More can hold nothing but fields the model refuses, each of which costs
# validation time and memory for its error.
MAX_ENCOUNTER_BYTES = 8 * _LARGEST_ENCOUNTER_BYTES


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
    return pl.DataFrame({name: pl.Series(name, values[name], REQUEST_DTYPES[name], strict=False) for name in FIELDS})


def features_frame(
    values: Mapping[str, list[Any]] | Sequence[Mapping[str, Any]] | pl.DataFrame, states: pl.DataFrame | None = None
) -> pl.DataFrame:
    """Validated encounters (a typed frame, columns, or records as `record` gives them) and their patients' history
    states (`history.STATE` columns, a null row where none is known; None: none for any) → their feature columns
    (`FEATURE_COLUMNS`), by the rules of `cleaning.clean`, `features.build_features` and `history` that made the
    training data."""
    typed = values if isinstance(values, pl.DataFrame) else typed_frame(values)
    return feature_values(clean_request(typed), states)


def from_clean(row: dict[str, Any]) -> dict[str, Any]:
    """A row of the clean table → the request a hospital system would send for it (identifiers and label left out)."""
    return {
        name: NOT_TAKEN if name in NOT_MEASURED_COLUMNS and row[name] == schema.NOT_MEASURED else row[name]
        for name in FIELDS
    }
