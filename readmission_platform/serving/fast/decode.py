"""The `/predict_batch` body decoded into a typed frame by msgspec, checked as the request model would check it.

msgspec decodes and checks a large body in C several times faster than pydantic (benchmarks/README.md). It is only
the fast path: whatever it refuses goes to pydantic's request model (`encounter.BatchRequest`), whose errors name
every offending field; the tests hold the two to the same answers.
"""

from __future__ import annotations

import logging
from typing import Annotated, Any, Literal

import msgspec
import polars as pl
from pydantic import ValidationError

from readmission_platform.lib import schema
from readmission_platform.lib.encounter import (
    FIELDS,
    MAX_BATCH,
    MAX_PATIENT_ID,
    MAX_REQUEST_ID,
    PATIENT_ID,
    MAX_TEXT,
    REQUEST_DTYPES,
    REQUEST_ID,
    REQUEST_ID_PATTERN,
    TRIMMED,
    BatchRequest,
    allowed,
    attribute,
    columns,
    typed_frame,
)

log = logging.getLogger(__name__)

# The batch request for msgspec. Text patterns are matched afterwards, a column at a time, by polars, with the Rust
# regex engine pydantic uses too; msgspec would call Python's re once per value, which costs more than the rest of the
# decoding and differs at "$" before a final newline.
_PATTERNS = {
    name: column.pattern.pattern if column.pattern is not None else TRIMMED
    for name in FIELDS
    if (column := schema.CLEAN_BY_NAME[name]).allowed is None and column.range is None
} | {REQUEST_ID: REQUEST_ID_PATTERN, PATIENT_ID: REQUEST_ID_PATTERN}


def _fast_annotation(column: schema.Column) -> Any:
    if column.allowed is not None:
        typ: Any = Literal[allowed(column)]  # type: ignore[valid-type]
    elif column.range is not None:
        typ = Annotated[int, msgspec.Meta(ge=column.range[0], le=column.range[1])]
    elif column.pattern is not None:
        typ = str
    else:
        typ = Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_TEXT)]
    return typ | None if column.nullable else typ


_REQUIRED = [n for n in FIELDS if not schema.CLEAN_BY_NAME[n].nullable]
_OPTIONAL = [n for n in FIELDS if schema.CLEAN_BY_NAME[n].nullable]
_FAST_ORDER = (*_REQUIRED, *_OPTIONAL, REQUEST_ID, PATIENT_ID)  # msgspec wants the fields with defaults last
_FastEncounter = msgspec.defstruct(
    "Encounter",
    [(attribute(n), _fast_annotation(schema.CLEAN_BY_NAME[n]), msgspec.field(name=n)) for n in _REQUIRED]
    + [(attribute(n), _fast_annotation(schema.CLEAN_BY_NAME[n]), msgspec.field(default=None, name=n)) for n in _OPTIONAL]
    + [(REQUEST_ID, Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_REQUEST_ID)] | None, None)]
    + [(PATIENT_ID, Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_PATIENT_ID)] | None, None)],
    forbid_unknown_fields=True,
    gc=False,
)
_FastBatch = msgspec.defstruct(
    "BatchRequest",
    [("encounters", Annotated[list[_FastEncounter], msgspec.Meta(min_length=1, max_length=MAX_BATCH)])],
    forbid_unknown_fields=True,
)
_BATCH = msgspec.json.Decoder(_FastBatch)

_DTYPES = {**REQUEST_DTYPES, REQUEST_ID: pl.String(), PATIENT_ID: pl.String()}


def decode_batch(body: bytes) -> pl.DataFrame:
    """A batch request's body → its encounters as a frame: FIELDS typed as `typed_frame` gives them, request_id and
    patient_id.

    Raises pydantic's `ValidationError`, which names every offending field (`["encounters", 12, "age"]`), for a body
    that is not a valid batch request.
    """
    try:
        encounters = _BATCH.decode(body).encounters
    except (msgspec.ValidationError, msgspec.DecodeError):
        return _by_request_model(body)
    values = zip(*map(msgspec.structs.astuple, encounters), strict=True)
    frame = pl.DataFrame([pl.Series(name, column, _DTYPES[name]) for name, column in zip(_FAST_ORDER, values)])
    if frame.select(pl.any_horizontal(~pl.col(n).str.contains(p) for n, p in _PATTERNS.items()).any()).item():
        return _by_request_model(body)
    return frame.select(*FIELDS, REQUEST_ID, PATIENT_ID)


# Keys no encounter has (nor a batch request) are validated, and named in the 400, at most this many per object; the
# rest are counted. Each error of an object holds a copy of the object: a flood of unknown keys cost gigabytes.
NAMED_UNKNOWN_KEYS = 10
_KNOWN_KEYS = frozenset({*FIELDS, REQUEST_ID, PATIENT_ID})


def _pruned(body: bytes) -> tuple[bytes, int]:
    """The body with the unknown keys of each object (the request, each encounter) past the first NAMED_UNKNOWN_KEYS
    left out, and how many were; the body itself when none were, or it is not JSON."""
    try:
        document = msgspec.json.decode(body)
    except msgspec.DecodeError:
        return body, 0
    left_out = 0

    def prune(mapping: dict, known: frozenset[str]) -> None:
        nonlocal left_out
        unknown = [key for key in mapping if key not in known]
        for key in unknown[NAMED_UNKNOWN_KEYS:]:
            del mapping[key]
        left_out += max(0, len(unknown) - NAMED_UNKNOWN_KEYS)

    if isinstance(document, dict):
        prune(document, frozenset({"encounters"}))
        encounters = document.get("encounters")
        for encounter in encounters if isinstance(encounters, list) else ():
            if isinstance(encounter, dict):
                prune(encounter, _KNOWN_KEYS)
    return (msgspec.json.encode(document), left_out) if left_out else (body, 0)


def _by_request_model(body: bytes) -> pl.DataFrame:
    """`decode_batch` by the request model, for a body the fast path refused: raises, naming each offending field
    (and counting in `unvalidated_keys` the unknown keys past NAMED_UNKNOWN_KEYS an object had)."""
    pruned, left_out = _pruned(body)
    try:
        valid = BatchRequest.model_validate_json(pruned)
    except ValidationError as error:
        error.unvalidated_keys = left_out  # each one more error: `contract.invalid` counts them
        raise
    # The fast path refused what the request model accepts: a gap between the two to mend, not the client's fault.
    log.warning("the fast batch decoder refused a body the request model accepts; decoded by the request model")
    rows = valid.encounters
    return typed_frame(columns(rows)).with_columns(
        pl.Series(REQUEST_ID, [e.request_id for e in rows], pl.String),
        pl.Series(PATIENT_ID, [e.patient_id for e in rows], pl.String),
    )
