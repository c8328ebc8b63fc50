"""The Batch page's work: a CSV export of encounters checked row by row against the schema, the valid rows scored
through /predict_batch in chunks, and the file given back with the scores.

The export may hold the data set's identifier and label columns; they stay in the file given back and are never sent.
"""

from __future__ import annotations

import io
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import polars as pl
from pydantic import ValidationError

from readmission_platform.app.client import ServiceClient
from readmission_platform.lib import schema
from readmission_platform.lib.encounter import FIELDS, REQUEST_DTYPES, BatchEncounter, attribute, record

CHUNK = 1_000  # encounters per /predict_batch request: the progress bar moves once per chunk
SCORES = ("probability", "risk_band", "flagged", "model_version", "problem")
_BY_ATTRIBUTE = {attribute(name): name for name in FIELDS}


class UploadError(ValueError):
    """The file as a whole cannot be read as encounters; nothing of it is scored."""


@dataclass(frozen=True)
class Checked:
    """An upload read and checked: its rows as given, the requests of the valid ones, the problem of each other."""

    rows: pl.DataFrame  # the file's columns as text, in its order
    requests: list[dict[str, Any] | None]  # per row: the encounter to send, or None
    problems: list[str | None]  # per row: what is wrong, in words, or None

    @property
    def valid(self) -> int:
        return sum(p is None for p in self.problems)


def read_upload(content: bytes, name: str = "the file") -> pl.DataFrame:
    """The CSV's rows as text; UploadError if it is not UTF-8 CSV with every request column in its header."""
    try:
        text = content.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise UploadError(f"{name} is not UTF-8 text (byte {error.start}); expected a CSV export") from None
    if not text.strip():
        raise UploadError(f"{name} is empty; expected a header with the columns {', '.join(FIELDS)}")
    try:
        rows = pl.read_csv(io.StringIO(text), infer_schema=False, truncate_ragged_lines=False)
    except pl.exceptions.PolarsError as error:
        raise UploadError(f"{name} is not a readable CSV: {str(error).splitlines()[0]}") from None
    if missing := [n for n in FIELDS if n not in rows.columns]:
        raise UploadError(f"{name} has no column {', '.join(missing)}; expected the data set's columns "
                          f"({', '.join(FIELDS)}), as the hospital system exports them")  # fmt: skip
    if rows.is_empty():
        raise UploadError(f"{name} has a header but no rows")
    return rows


_INTEGER = re.compile(r"[+-]?[0-9]+")


def _typed(name: str, text: str | None) -> Any:
    if text is None or text.strip() in ("", schema.MISSING):
        return None
    if REQUEST_DTYPES[name].is_integer():
        # As ingestion casts it: ASCII digits with an optional sign. Python's int() would also take `1_0` and other
        # scripts' digits, which the platform's own batches refuse.
        if _INTEGER.fullmatch(text.strip()):
            return int(text)
        return text  # the model names it, with what it expects
    return text


def _in_words(error: ValidationError) -> str:
    """Each offending column with what it holds and what it may hold."""
    said = []
    for problem in error.errors(include_url=False):
        name = _BY_ATTRIBUTE.get(str(problem["loc"][0]), str(problem["loc"][0]))
        column = schema.CLEAN_BY_NAME.get(name)
        if problem["type"] == "missing":
            said.append(f"'{name}' is empty; it is required")
        elif column is not None:
            expected = schema.expected_values(column).replace(schema.NOT_MEASURED, schema.NOT_TAKEN)
            said.append(f"'{name}' holds {problem.get('input')!r}; expected {expected}")
        else:
            said.append(f"'{name}': {problem['msg']}")
    return "; ".join(said)


def check_rows(rows: pl.DataFrame) -> Checked:
    """Each row checked against the request model; a row discharged to death or hospice is a problem too, as the
    service scores none."""
    requests: list[dict[str, Any] | None] = []
    problems: list[str | None] = []
    for line, row in enumerate(rows.select(FIELDS).iter_rows(named=True), start=2):
        try:
            encounter = BatchEncounter.model_validate({name: _typed(name, row[name]) for name in FIELDS})
        except ValidationError as error:
            requests.append(None)
            problems.append(f"line {line}: {_in_words(error)}")
            continue
        if encounter.discharge_disposition_id in schema.DEATH_OR_HOSPICE_DISPOSITIONS:
            requests.append(None)
            problems.append(f"line {line}: discharge disposition {encounter.discharge_disposition_id} is death or "
                            "hospice; no readmission risk is predicted for them")  # fmt: skip
            continue
        requests.append(record(encounter))
        problems.append(None)
    return Checked(rows, requests, problems)


def score(checked: Checked, client: ServiceClient, progress: Callable[[int, int], None] = lambda done, total: None,
          chunk: int = CHUNK) -> pl.DataFrame:  # fmt: skip
    """The uploaded rows with SCORES appended: valid rows scored through /predict_batch `chunk` at a time (`progress`
    told after each), the others with their problem. All chunks are one model version unless it changes between them,
    which `model_version` shows."""
    positions = [i for i, request in enumerate(checked.requests) if request is not None]
    height = checked.rows.height
    probability: list[float | None] = [None] * height
    band: list[str | None] = [None] * height
    flagged: list[bool | None] = [None] * height
    version: list[str | None] = [None] * height
    for start in range(0, len(positions), chunk):
        part = positions[start : start + chunk]
        answer = client.predict_batch([checked.requests[i] for i in part])
        for i, item in zip(part, answer["predictions"], strict=True):
            probability[i], band[i], flagged[i] = item["probability"], item["risk_band"], item["decision"]
            version[i] = item.get("model_version") or answer["model_version"]
        progress(min(start + chunk, len(positions)), len(positions))
    return checked.rows.with_columns(
        pl.Series("probability", probability, pl.Float64),
        pl.Series("risk_band", band, pl.String),
        pl.Series("flagged", flagged, pl.Boolean),
        pl.Series("model_version", version, pl.String),
        pl.Series("problem", checked.problems, pl.String),
    )
