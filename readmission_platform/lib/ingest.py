"""Read a landed batch file as delivered: every column as text, bad rows set aside with their reason."""

from __future__ import annotations

import csv
import hashlib
from dataclasses import dataclass
from datetime import datetime

import polars as pl

from readmission_platform.lib import schema

EXAMPLES = 5


class BatchFileError(Exception):
    """The batch file as a whole cannot be loaded; nothing of it is written."""


def header_problem(header: list[str]) -> str | None:
    """Why a header is not the data set's schema, or None when it is (column order is free)."""
    missing = [c for c in schema.RAW_COLUMNS if c not in header]
    extra = [c for c in header if c not in schema.RAW_COLUMNS]
    repeated = sorted({c for c in header if header.count(c) > 1})
    if not (missing or extra or repeated):
        return None
    parts = [f"missing {missing}" if missing else "", f"unexpected {extra}" if extra else ""]
    parts.append(f"repeated {repeated}" if repeated else "")
    return (
        "header does not match the encounter schema: "
        + "; ".join(p for p in parts if p)
        + f" (expected the {len(schema.RAW_COLUMNS)} columns {schema.RAW_COLUMNS[0]}, …, {schema.RAW_COLUMNS[-1]})"
    )


@dataclass(frozen=True)
class ParsedBatch:
    rows: pl.DataFrame  # schema.RAW_SCHEMA
    rejected: pl.DataFrame  # schema.REJECTED_SCHEMA


_RAW_COLUMNS = [pl.col(n).cast(t) for n, t in schema.RAW_SCHEMA.items()]
_REJECTED_COLUMNS = [pl.col(n).cast(t) for n, t in schema.REJECTED_SCHEMA.items()]

def _field_count(line: str) -> int:
    # Quotes are rare in these exports; only a quoted line pays for the csv module.
    return len(next(csv.reader([line]))) if '"' in line else line.count(",") + 1


@dataclass(frozen=True)
class ReadBatch:
    """A batch file cut into lines and fields, before any row is judged against the stored ones."""

    rows: pl.DataFrame  # the well-formed lines: their fields as text, line_number, raw_line, row_hash
    malformed: pl.DataFrame  # line_number, raw_line, reason, encounter_id (as far as it can be read)


def read_batch(content: bytes, source_file: str) -> ReadBatch:
    """Cut a batch file into lines and fields; `BatchFileError` when the file as a whole cannot be loaded.

    A line with the wrong number of fields or a NUL byte is malformed; the others are well formed.
    """
    try:
        text = content.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise BatchFileError(
            f"{source_file} is not UTF-8 text: byte {content[error.start]:#04x} at offset {error.start}"
        ) from None
    # Only CR and LF end a CSV line; str.splitlines() would also break inside fields at \x0c, \x85, \u2028, ….
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    lines = text.split("\n")
    if not lines or not lines[0].strip():
        raise BatchFileError(f"{source_file} is empty; expected a header line with the {len(schema.RAW_COLUMNS)} columns")
    header = [name.strip() for name in next(csv.reader([lines[0]]))]
    if problem := header_problem(header):
        raise BatchFileError(f"{source_file}: {problem}")

    body = lines[1:]
    numbered = pl.DataFrame(
        {
            "line_number": pl.int_range(2, len(lines) + 1, eager=True),
            "raw_line": pl.Series(body, dtype=pl.String),
            "fields": pl.Series([_field_count(line) for line in body], dtype=pl.Int64),
        }
    ).filter(pl.col("raw_line").str.strip_chars() != "")
    if not numbered.height:
        raise BatchFileError(f"{source_file} holds a header but no encounters")
    problem = (
        pl.when(pl.col("raw_line").str.contains("\x00", literal=True))
        .then(pl.lit("holds a NUL byte, which no field may contain"))
        .when(pl.col("fields") != len(header))
        .then(pl.format("has {} fields; expected {}", pl.col("fields"), pl.lit(len(header))))
    )
    judged_lines = numbered.with_columns(reason=problem)
    malformed = (
        judged_lines.filter(pl.col("reason").is_not_null())
        .select("line_number", "raw_line", "reason")
        .with_columns(encounter_id=pl.col("raw_line").str.split(",").list.get(header.index("encounter_id"), null_on_oob=True))
    )
    well_formed = judged_lines.filter(pl.col("reason").is_null()).select("line_number", "raw_line")
    digest = hashlib.blake2b
    hashes = pl.Series(
        [digest(lines[n - 1].encode(), digest_size=16).digest() for n in well_formed["line_number"].to_list()], dtype=pl.Binary
    )
    rows = _read_fields(well_formed["raw_line"], header).with_columns(well_formed, row_hash=hashes.bin.encode("hex"))
    return ReadBatch(rows, malformed)


def judge_batch(
    read: ReadBatch, *, batch_id: str, source_file: str, loaded_elsewhere: pl.DataFrame, now: datetime
) -> ParsedBatch:
    """Accept or reject each well-formed row (see `parse_batch`) and add the lineage columns."""
    judged = _judge(read.rows, loaded_elsewhere)
    accepted = judged.filter(pl.col("reason").is_null())
    rejected = pl.concat([read.malformed, judged.filter(pl.col("reason").is_not_null())], how="diagonal")
    lineage = {schema.BATCH_ID: pl.lit(batch_id), "source_file": pl.lit(source_file)}
    return ParsedBatch(
        accepted.with_columns(ingested_at=pl.lit(now), **lineage).select(_RAW_COLUMNS),
        rejected.sort("line_number").with_columns(rejected_at=pl.lit(now), **lineage).select(_REJECTED_COLUMNS),
    )


def parse_batch(
    content: bytes,
    *,
    batch_id: str,
    source_file: str,
    loaded_elsewhere: pl.DataFrame,
    now: datetime,
) -> ParsedBatch:
    """Parse one batch file.

    `loaded_elsewhere` holds (encounter_id, batch_id) of the rows other batches already stored;
    a row repeating one of those ids, or an id seen earlier in this file, is rejected, as is a row
    with the wrong number of fields, a NUL byte, or an id that is not a positive integer.
    """
    return judge_batch(
        read_batch(content, source_file), batch_id=batch_id, source_file=source_file, loaded_elsewhere=loaded_elsewhere, now=now
    )


def _read_fields(lines: pl.Series, header: list[str]) -> pl.DataFrame:
    if not lines.len():
        return pl.DataFrame(schema={name: pl.String for name in header})
    return pl.read_csv(
        "\n".join(lines).encode(),
        has_header=False,
        new_columns=header,
        infer_schema=False,
        empty_string_is_null=False,
    )


def _judge(rows: pl.DataFrame, loaded_elsewhere: pl.DataFrame) -> pl.DataFrame:
    """Give each row the reason it cannot be accepted, or null."""

    def as_id(name: str) -> pl.Expr:
        text = pl.col(name).str.strip_chars()
        return pl.when(text.str.contains(r"^[0-9]{1,18}$")).then(text.cast(pl.Int64, strict=False))

    elsewhere = loaded_elsewhere.select(
        pl.col("encounter_id").cast(pl.Int64).alias("_id"), pl.col(schema.BATCH_ID).alias("_loaded_in")
    ).unique("_id", keep="first")
    judged = (
        rows.with_columns(_id=as_id("encounter_id"), _patient=as_id("patient_nbr"))
        # Only a row that could load claims its id: a malformed one does not shadow a later good copy.
        .with_columns(
            _first_line=pl.when((pl.col("_id") > 0) & (pl.col("_patient") > 0))
            .then(pl.col("line_number"))
            .min()
            .over("_id")
        )
        .join(elsewhere, on="_id", how="left", maintain_order="left")
    )
    reason = (
        pl.when(pl.col("_id").is_null() | (pl.col("_id") <= 0))
        .then(pl.format("encounter_id '{}' is not a positive integer", pl.col("encounter_id")))
        .when(pl.col("_patient").is_null() | (pl.col("_patient") <= 0))
        .then(pl.format("patient_nbr '{}' is not a positive integer", pl.col("patient_nbr")))
        .when(pl.col("_first_line") < pl.col("line_number"))
        .then(pl.format("encounter_id {} repeats line {} of this batch", pl.col("_id"), pl.col("_first_line")))
        .when(pl.col("_loaded_in").is_not_null())
        .then(pl.format("encounter_id {} was already loaded in batch {}", pl.col("_id"), pl.col("_loaded_in")))
    )
    return judged.with_columns(reason=reason).drop("_id", "_patient", "_first_line", "_loaded_in")
