"""Read a landed batch file as delivered: every column as text, bad rows set aside with their reason."""

from __future__ import annotations

import codecs
import csv
import hashlib
from concurrent.futures import ThreadPoolExecutor
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


def _hashes(lines: list[bytes]) -> pl.Series:
    """Each line's blake2b-128 in hex: the row's content hash."""
    digest = hashlib.blake2b
    return pl.Series([digest(line, digest_size=16).digest() for line in lines], dtype=pl.Binary).bin.encode("hex")


_QUOTING = 'a quote may open a field only if another closes it, and a quote inside a quoted field is written twice ("")'


def _read_quoted(lines: pl.Series) -> tuple[list[list[str]], list[str | None]]:
    """Each line's fields as the csv module reads them, and why a line cannot be read (else None).

    Only a quote opening a field starts a quoted one; a quoted field that does not end at its closing quote is not
    guessed at (the module's non-strict reading would drop its quotes).
    """
    fields: list[list[str]] = []
    problems: list[str | None] = []
    for line in lines:
        try:
            fields.append(next(csv.reader([line], strict=True)))
            problems.append(None)
        except csv.Error as error:
            fields.append([])
            problems.append(f"is not valid CSV ({error}): {_QUOTING}")
    return fields, problems


@dataclass(frozen=True)
class ReadBatch:
    """A batch file cut into lines and fields, before any row is judged against the stored ones."""

    rows: pl.DataFrame  # the well-formed lines: their fields as text, line_number, raw_line, row_hash
    malformed: pl.DataFrame  # line_number, raw_line, reason, encounter_id (as far as it can be read)


def _lines(data: bytes) -> bytes:
    # Only CR and LF end a CSV line; str.splitlines() would also break inside fields at \x0c, \x85, \u2028, ….
    return data.replace(b"\r\n", b"\n").replace(b"\r", b"\n") if b"\r" in data else data


def _read_plain(body: bytes, header: list[str]) -> ReadBatch | None:
    """The fast path for the usual file: no quotes, no NUL, no blank line, every line of the header's width.

    The whole body is one CSV parse and no line is looked at alone; None when any of that does not hold, and the
    file then goes the careful way.
    """
    newline = b"\r\n" if b"\r" in body else b"\n"
    if b'"' in body or b"\x00" in body or (newline == b"\r\n" and body.count(b"\r") != body.count(b"\r\n")):
        return None
    lines = body.split(newline)
    if lines and lines[-1] == b"":
        lines.pop()
    # Without quotes every comma separates two fields; a line too wide fails the parse, so the count proves that
    # no line is too narrow either.
    if not lines or b"" in lines or body.count(b",") != len(lines) * (len(header) - 1):
        return None
    with ThreadPoolExecutor(1, thread_name_prefix="row-hash") as hashing:
        hashes = hashing.submit(_hashes, lines)
        try:
            fields = pl.read_csv(body, has_header=False, new_columns=header, infer_schema=False, empty_string_is_null=False)
        except pl.exceptions.PolarsError:  # a line too wide, bytes that are not UTF-8
            return None
        if fields.height != len(lines):
            return None
        rows = fields.with_columns(
            line_number=pl.int_range(2, len(lines) + 2, eager=True),
            raw_line=pl.Series(lines, dtype=pl.Binary).cast(pl.String),
            row_hash=hashes.result(),
        )
    malformed = pl.DataFrame(schema={"line_number": pl.Int64, "raw_line": pl.String, "reason": pl.String, "encounter_id": pl.String})
    return ReadBatch(rows, malformed)


def _not_utf8(content: bytes) -> UnicodeDecodeError:
    try:
        content.decode("utf-8")
    except UnicodeDecodeError as error:
        return error
    raise AssertionError("polars refused text that Python decodes")


def read_batch(content: bytes, source_file: str) -> ReadBatch:
    """Cut a batch file into lines and fields; `BatchFileError` when the file as a whole cannot be loaded.

    A line with the wrong number of fields, a NUL byte or a quoted field that does not end at its closing quote is
    malformed; the others are well formed.
    """
    data = content.removeprefix(codecs.BOM_UTF8)
    header_line, _, body = data.partition(b"\n")
    header_line = header_line.removesuffix(b"\r")
    if b"\r" in header_line:  # a file whose lines end in CR alone
        data = _lines(data)
        header_line, _, body = data.partition(b"\n")
    try:
        text = pl.Series("raw_line", [body], dtype=pl.Binary).cast(pl.String)  # checks UTF-8 without a Python copy
        header_text = header_line.decode()
    except (pl.exceptions.ComputeError, UnicodeDecodeError):
        error = _not_utf8(content)
        raise BatchFileError(f"{source_file} is not UTF-8 text: byte {content[error.start]:#04x} at offset {error.start}") from None
    if not header_text.strip():
        raise BatchFileError(f"{source_file} is empty; expected a header line with the {len(schema.RAW_COLUMNS)} columns")
    header = [name.strip() for name in next(csv.reader([header_text]))]
    if problem := header_problem(header):
        raise BatchFileError(f"{source_file}: {problem}")

    if (plain := _read_plain(body, header)) is not None:
        return plain
    if b"\r" in body:  # the careful way cuts lines at "\n" alone
        body = _lines(body)
        text = pl.Series("raw_line", [body], dtype=pl.Binary).cast(pl.String)
    # Hashing the lines is Python work, cutting them into fields polars work: one runs in a thread beside the other.
    with ThreadPoolExecutor(1, thread_name_prefix="row-hash") as hashing:
        hashes = hashing.submit(lambda: _hashes(body.split(b"\n")))
        lines = text.str.split("\n").explode()
        numbered = pl.DataFrame({"line_number": pl.int_range(2, lines.len() + 2, eager=True), "raw_line": lines})
        numbered = numbered.filter(pl.col("raw_line").str.strip_chars() != "")
        if not numbered.height:
            raise BatchFileError(f"{source_file} holds a header but no encounters")
        # A line with a quote is cut by the csv module alone, the others (nearly all) by polars: polars reads quotes
        # its own way, and a stray one would swallow the lines after it.
        quoted = numbered["raw_line"].str.contains('"', literal=True)
        quoted_fields, quoting = _read_quoted(numbered["raw_line"].filter(quoted))
        numbered = numbered.with_columns(
            fields=(numbered["raw_line"].str.count_matches(",", literal=True) + 1).scatter(
                quoted.arg_true(), [len(f) for f in quoted_fields]
            ),
            quoting=pl.repeat(None, numbered.height, dtype=pl.String, eager=True).scatter(quoted.arg_true(), quoting),
            quoted=quoted,
            quoted_index=quoted.cum_sum() - 1,
        )
        problem = (
            pl.when(pl.col("raw_line").str.contains("\x00", literal=True))
            .then(pl.lit("holds a NUL byte, which no field may contain"))
            .when(pl.col("quoting").is_not_null())
            .then(pl.col("quoting"))
            .when(pl.col("fields") != len(header))
            .then(pl.format("has {} fields; expected {}", pl.col("fields"), pl.lit(len(header))))
        )
        judged_lines = numbered.with_columns(reason=problem)
        malformed = (
            judged_lines.filter(pl.col("reason").is_not_null())
            .select("line_number", "raw_line", "reason")
            .with_columns(encounter_id=pl.col("raw_line").str.split(",").list.get(header.index("encounter_id"), null_on_oob=True))
        )
        well_formed = judged_lines.filter(pl.col("reason").is_null())
        plain_lines = well_formed.filter(~pl.col("quoted"))
        fields = _read_fields(plain_lines["raw_line"], header).with_columns(plain_lines["line_number"])
        quoted_lines = well_formed.filter(pl.col("quoted"))
        if quoted_lines.height:
            rows = [quoted_fields[i] for i in quoted_lines["quoted_index"]]
            read_quoted = pl.DataFrame(rows, schema=header, orient="row").with_columns(quoted_lines["line_number"])
            fields = pl.concat([fields, read_quoted]).sort("line_number")
        well_formed = well_formed.select("line_number", "raw_line")
        row_hash = hashes.result().gather(well_formed["line_number"] - 2)
    return ReadBatch(fields.drop("line_number").with_columns(well_formed, row_hash=row_hash), malformed)


def judge_batch(
    read: ReadBatch, *, batch_id: str, source_file: str, loaded_elsewhere: pl.DataFrame, now: datetime
) -> ParsedBatch:
    """Accept or reject each well-formed row (see `parse_batch`) and add the lineage columns."""
    judged = _judge(read.rows, loaded_elsewhere)
    lineage = {schema.BATCH_ID: pl.lit(batch_id), "source_file": pl.lit(source_file)}
    accepted = judged.lazy().filter(pl.col("reason").is_null()).with_columns(ingested_at=pl.lit(now), **lineage)
    rejected = pl.concat([read.malformed.lazy(), judged.lazy().filter(pl.col("reason").is_not_null())], how="diagonal")
    rows, rejected_rows = pl.collect_all(
        [
            accepted.select(_RAW_COLUMNS),
            rejected.sort("line_number").with_columns(rejected_at=pl.lit(now), **lineage).select(_REJECTED_COLUMNS),
        ]
    )
    return ParsedBatch(rows, rejected_rows)


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
    with the wrong number of fields, a NUL byte, a quoted field that does not end at its closing quote, or an id
    that is not a positive integer.
    """
    return judge_batch(
        read_batch(content, source_file), batch_id=batch_id, source_file=source_file, loaded_elsewhere=loaded_elsewhere, now=now
    )


def _read_fields(lines: pl.Series, header: list[str]) -> pl.DataFrame:
    if not lines.len():
        return pl.DataFrame(schema={name: pl.String for name in header})
    return pl.read_csv(
        lines.str.join("\n").item().encode(),
        has_header=False,
        new_columns=header,
        infer_schema=False,
        empty_string_is_null=False,
    )


def _as_id(name: str) -> pl.Expr:
    text = pl.col(name).str.strip_chars()
    return pl.when(text.str.contains(r"^[0-9]{1,18}$")).then(text.cast(pl.Int64, strict=False))


# Built once, for `_judge`.
_IDS = {"_id": _as_id("encounter_id"), "_patient": _as_id("patient_nbr")}
# Only a row that could load claims its id: a malformed one does not shadow a later good copy.
_FIRST_LINE = pl.when((pl.col("_id") > 0) & (pl.col("_patient") > 0)).then(pl.col("line_number")).min().over("_id")
_REASON = (
    pl.when(pl.col("_id").is_null() | (pl.col("_id") <= 0))
    .then(pl.format("encounter_id '{}' is not a positive integer", pl.col("encounter_id")))
    .when(pl.col("_patient").is_null() | (pl.col("_patient") <= 0))
    .then(pl.format("patient_nbr '{}' is not a positive integer", pl.col("patient_nbr")))
    .when(pl.col("_first_line") < pl.col("line_number"))
    .then(pl.format("encounter_id {} repeats line {} of this batch", pl.col("_id"), pl.col("_first_line")))
    .when(pl.col("_loaded_in").is_not_null())
    .then(pl.format("encounter_id {} was already loaded in batch {}", pl.col("_id"), pl.col("_loaded_in")))
)


def _judge(rows: pl.DataFrame, loaded_elsewhere: pl.DataFrame) -> pl.DataFrame:
    """Give each row the reason it cannot be accepted, or null."""
    judged = rows.with_columns(**_IDS).with_columns(_first_line=_FIRST_LINE)
    # Which batch holds an id is looked up only for the ids another batch holds, usually none.
    stored = loaded_elsewhere.filter(pl.col("encounter_id").cast(pl.Int64).is_in(judged["_id"].drop_nulls().implode()))
    if stored.height:
        elsewhere = stored.select(pl.col("encounter_id").cast(pl.Int64).alias("_id"), pl.col(schema.BATCH_ID).alias("_loaded_in"))
        judged = judged.join(elsewhere.unique("_id", keep="first"), on="_id", how="left", maintain_order="left")
    else:
        judged = judged.with_columns(_loaded_in=pl.lit(None, pl.String))
    return judged.with_columns(reason=_REASON).drop("_id", "_patient", "_first_line", "_loaded_in")
