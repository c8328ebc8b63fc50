"""Outcomes as the hospital system sends them back: which predicted encounters were readmitted within 30 days.

A file of outcomes is a CSV with a header: `request_id` (the client's id of a prediction) or `encounter_id` (the
encounter as landed, which a client that sends it as its `request_id` may use instead), `readmitted_30d` (0/1 or
false/true) and `known_at` (ISO 8601, with a time zone or in UTC), one outcome a line; blank lines are skipped. A file
with a wrong header, a line that is not a row of the header's fields or a value of the wrong kind is refused whole,
naming the lines. Of a good file, an outcome for a request the prediction log does not hold is set aside as
`unknown request`, and one for a request that already has an outcome as `second outcome`; both are kept and counted.
"""

from __future__ import annotations

import csv
import re
from collections.abc import Collection
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import polars as pl

from readmission_platform.lib.landing import landed_files, write_atomically
from readmission_platform.lib.reporting import examples

OUTCOMES, SET_ASIDE = "outcomes", "outcomes_set_aside"
KEYS = ("request_id", "encounter_id")
VALUES = ("readmitted_30d", "known_at")
TIME = pl.Datetime("us", "UTC")
OUTCOME_SCHEMA = {
    "batch_id": pl.String(), "request_id": pl.String(), "readmitted_30d": pl.Boolean(), "known_at": TIME,
    "source_file": pl.String(), "line_number": pl.Int64(), "ingested_at": TIME,
}  # fmt: skip
SET_ASIDE_SCHEMA = OUTCOME_SCHEMA | {"reason": pl.String()}
UNKNOWN_REQUEST, SECOND_OUTCOME = "unknown request", "second outcome"
# Fields separated by commas, each plain (no quote, no comma) or quoted whole with any quote inside doubled.
_QUOTED_LINE = re.compile(r'(?:"(?:[^"]|"")*"|[^",]*)(?:,(?:"(?:[^"]|"")*"|[^",]*))*')
_TRUE, _FALSE = ("1", "true", "True", "TRUE"), ("0", "false", "False", "FALSE")


class OutcomeFileError(Exception):
    """The outcome file as a whole cannot be loaded; nothing of it is written."""


@dataclass(frozen=True)
class ParsedOutcomes:
    outcomes: pl.DataFrame  # OUTCOME_SCHEMA: one per predicted request
    set_aside: pl.DataFrame  # SET_ASIDE_SCHEMA: unknown requests and second outcomes, with the reason


def _bad(frame: pl.DataFrame, wrong: pl.Expr, column: str, expected: str) -> str | None:
    found = frame.filter(wrong)
    if found.is_empty():
        return None
    shown = [value or "(empty)" for value in found[column].to_list()]
    return (
        f"column {column!r} holds {examples(shown)} on {found.height} lines "
        f"(line {examples(found['line_number'].to_list())}); expected {expected}"
    )


def _times(text: pl.Series) -> tuple[dict[str, datetime | None], set[str]]:
    """Each distinct ISO 8601 text → its UTC time (a time without a zone is taken as UTC), or None if it is none;
    and the texts that are ISO 8601 but whose UTC time falls outside the years 1 to 9999."""
    times: dict[str, datetime | None] = {}
    beyond: set[str] = set()
    for value in text.unique():
        times[value] = None
        try:
            at = datetime.fromisoformat(value)
        except ValueError:
            continue
        try:
            times[value] = at.replace(tzinfo=UTC) if at.tzinfo is None else at.astimezone(UTC)
        except OverflowError:
            beyond.add(value)
    return times, beyond


def _fields(line: str) -> list[str] | str:
    """A CSV line's fields, or why it has none (quotes that are not CSV quoting, a NUL byte)."""
    if "\x00" in line:
        return "holds a NUL byte"
    if '"' not in line:
        return line.split(",")
    if not _QUOTED_LINE.fullmatch(line):
        return "has a quote that does not enclose a whole field"
    return next(csv.reader([line]))


def _rows(lines: list[str], header: list[str]) -> tuple[pl.DataFrame, list[str]]:
    """The well-formed lines' fields as text with line_number (the header is line 1), and what is wrong with the others.

    Each line is one outcome (no field holds a line break); blank lines are skipped, as in batch files.
    """
    rows, numbers, malformed = [], [], []
    for number, line in enumerate(lines, start=2):
        if not line.strip():
            continue
        fields = _fields(line)
        if isinstance(fields, list) and len(fields) != len(header):
            fields = f"has {len(fields)} fields"
        if isinstance(fields, str):
            malformed.append(f"line {number} {fields}")
        else:
            rows.append(fields)
            numbers.append(number)
    frame = pl.DataFrame(rows, schema=dict.fromkeys(header, pl.String()), orient="row")
    return frame.with_columns(line_number=pl.Series(numbers, dtype=pl.Int64)), malformed


def read_outcomes(content: bytes, source_file: str) -> pl.DataFrame:
    """The file's outcomes as request_id, readmitted_30d, known_at, line_number; OutcomeFileError naming what is wrong."""
    try:
        text = content.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise OutcomeFileError(f"{source_file} is not UTF-8 text (byte {error.start}); expected a CSV export") from None
    if not text.strip():
        raise OutcomeFileError(f"{source_file} is empty; expected a header {KEYS[0]} (or {KEYS[1]}), {', '.join(VALUES)}")
    header_line, *lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    header = _fields(header_line)
    if isinstance(header, str):
        raise OutcomeFileError(f"{source_file}: the header line {header}; expected {KEYS[0]},{','.join(VALUES)}")
    keys = [key for key in KEYS if key in header]
    missing = [name for name in VALUES if name not in header]
    extra = [name for name in header if name not in (*KEYS, *VALUES)]
    repeated = sorted({name for name in header if header.count(name) > 1})
    if len(keys) != 1 or missing or extra or repeated:
        raise OutcomeFileError(
            f"{source_file} has the header {header}; expected exactly one of {list(KEYS)} and {list(VALUES)}"
            + (f" (missing {missing})" if missing else "") + (f" (unexpected {extra})" if extra else "")
            + (f" (repeated {repeated})" if repeated else "")
        )  # fmt: skip
    frame, malformed = _rows(lines, header)
    if frame.is_empty() and not malformed:
        raise OutcomeFileError(f"{source_file} has a header and no outcomes")
    key = keys[0]
    times, beyond = _times(frame["known_at"])
    known_at = pl.col("known_at").replace_strict(times, return_dtype=TIME)
    problems = [
        f"{len(malformed)} lines are not rows of the header's {len(header)} fields ({examples(malformed)})"
        if malformed else None,
        _bad(frame, (pl.col(key) == "") | (pl.col(key).str.strip_chars() != pl.col(key)), key, "an id without spaces"),
        _bad(frame, pl.col(key).str.contains(r"^[1-9][0-9]*$").not_() & pl.lit(key == "encounter_id"), key,
             "a positive integer"),  # fmt: skip
        _bad(frame, pl.col("readmitted_30d").is_in((*_TRUE, *_FALSE)).not_(), "readmitted_30d", "0 or 1 (false or true)"),
        _bad(frame, known_at.is_null() & pl.col("known_at").is_in(list(beyond)).not_(), "known_at",
             "an ISO 8601 time such as 2026-03-01T08:00:00Z"),  # fmt: skip
        _bad(frame, pl.col("known_at").is_in(list(beyond)), "known_at", "a time within the years 1 to 9999 in UTC"),
    ]
    if problems := [p for p in problems if p]:
        raise OutcomeFileError(f"{source_file} was not loaded: " + "; ".join(problems))
    return frame.select(
        pl.col(key).alias("request_id"),
        pl.col("readmitted_30d").is_in(_TRUE).alias("readmitted_30d"),
        known_at.alias("known_at"),
        "line_number",
    )


def judge_outcomes(
    read: pl.DataFrame, *, batch_id: str, source_file: str, now: datetime, predicted: Collection[str], stored: pl.DataFrame
) -> ParsedOutcomes:
    """Split read outcomes into those stored and those set aside: requests not in `predicted`, and requests with an
    outcome already (in `stored`, request_id and batch_id of other files' outcomes, or earlier in this file)."""
    rows = read.with_columns(
        batch_id=pl.lit(batch_id), source_file=pl.lit(source_file), ingested_at=pl.lit(now).cast(TIME)
    ).join(stored.select("request_id", pl.col("batch_id").alias("first_in")), on="request_id", how="left")
    earlier = pl.col("line_number").rank("ordinal").over("request_id") > 1
    rows = rows.with_columns(
        reason=pl.when(pl.col("first_in").is_not_null())
        .then(pl.format(f"{SECOND_OUTCOME}: request already has an outcome from {{}}", pl.col("first_in")))
        .when(earlier)
        .then(pl.lit(f"{SECOND_OUTCOME}: request has an outcome on an earlier line of this file"))
        .when(pl.col("request_id").is_in(pl.Series(predicted, dtype=pl.String).implode()).not_())
        .then(pl.lit(f"{UNKNOWN_REQUEST}: no prediction in the log has this request_id"))
    )
    return ParsedOutcomes(
        outcomes=rows.filter(pl.col("reason").is_null()).select(list(OUTCOME_SCHEMA)),
        set_aside=rows.filter(pl.col("reason").is_not_null()).select(list(SET_ASIDE_SCHEMA)),
    )


OUTCOME_FILE = re.compile(r"^outcomes_(\d{4,})\.csv$")


def outcomes_csv(known: pl.DataFrame, known_at: datetime) -> bytes:
    """A file of outcomes as the hospital system sends it: `known` holds encounter_id and readmitted_30d."""
    return (
        known.select(
            pl.col("encounter_id").cast(pl.Int64),
            pl.col("readmitted_30d").cast(pl.Int8),
            pl.lit(known_at.astimezone(UTC).isoformat()).alias("known_at"),
        )
        .write_csv()
        .encode()
    )


def land_outcomes(content: bytes, folder: Path) -> Path:
    """Write a file of outcomes into `folder` as the next outcomes_NNNN.csv, whole or not at all."""
    folder.mkdir(parents=True, exist_ok=True)
    done = [int(m.group(1)) for p in landed_files(folder) if (m := OUTCOME_FILE.match(p.name))]
    path = folder / f"outcomes_{max(done, default=0) + 1:04d}.csv"
    write_atomically(path, content)
    return path
