"""Drop batch files into the landing folder the way an upstream hospital system would."""

from __future__ import annotations

import csv
import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path

from readmission_platform.lib.ingest import header_problem

BATCH_SIZE = 15_000
BATCH_FILE = re.compile(r"^batch_(\d{4,})\.csv$")
OUTCOMES_FOLDER = "outcomes"  # in the landing folder: files of outcomes (`lib/outcomes`)


def batch_file_name(index: int) -> str:
    return f"batch_{index:04d}.csv"


def batch_id_for(path: Path) -> str:
    """Partition key of a landed file: its stem, with characters a partition key cannot hold replaced."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", path.stem)


def landed_files(landing_dir: Path) -> list[Path]:
    """CSV files in the landing folder, oldest name first; files being written (hidden, .tmp) are skipped."""
    if not landing_dir.exists():
        return []
    return sorted(p for p in landing_dir.iterdir() if p.is_file() and p.suffix == ".csv" and not p.name.startswith("."))


class AmbiguousBatchFile(ValueError):
    """Two landed files make the same batch id; neither is loaded until one is renamed."""


def ambiguity(batch_id: str, paths: list[Path]) -> str:
    """Why the files `paths`, all of batch id `batch_id`, are not loaded, and what to do."""
    names = ", ".join(repr(p.name) for p in paths)
    return (
        f"the files {names} all make the batch id {batch_id!r}, so none of them is loaded; rename all but one "
        "(a name of letters, digits, '_', '.' and '-' alone is its own batch id)"
    )


def find_batch_file(landing_dir: Path, batch_id: str) -> Path | None:
    """The file landed as `batch_id`, None when there is none; `AmbiguousBatchFile` when there are several."""
    matches = [p for p in landed_files(landing_dir) if batch_id_for(p) == batch_id]
    if len(matches) > 1:
        raise AmbiguousBatchFile(ambiguity(batch_id, matches))
    return matches[0] if matches else None


def content_hash(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def split_batches(csv_bytes: bytes, batch_size: int = BATCH_SIZE) -> list[bytes]:
    """Cut a CSV into files of `batch_size` encounters, each with the header, the original text kept."""
    lines = csv_bytes.splitlines(keepends=True)
    if not lines:
        return []
    header, body = lines[0], [line for line in lines[1:] if line.strip()]
    return [header + b"".join(body[i : i + batch_size]) for i in range(0, len(body), batch_size)]


def write_atomically(path: Path, data: bytes) -> None:
    # The sensor skips hidden files, so it never sees a half-written batch.
    partial = path.with_name(f".{path.name}.partial")
    partial.write_bytes(data)
    os.replace(partial, path)


@dataclass(frozen=True)
class Landed:
    path: Path
    rows: int


def land(
    csv_bytes: bytes, landing_dir: Path, count: int | None, batch_size: int = BATCH_SIZE, *, source: str = "source"
) -> list[Landed]:
    """Land the next `count` batches of the source (all that remain when `count` is None); `source` names it in errors."""
    # A line ends at CR LF, LF or CR alone, as split_batches and the batch ingestion read it.
    first_line = re.split(rb"\r\n|\r|\n", csv_bytes, maxsplit=1)[0]
    header = next(csv.reader([first_line.decode("utf-8-sig", errors="replace").strip()]), [])
    if problem := header_problem([name.strip() for name in header]):
        raise ValueError(f"{source} not landed: {problem}")
    all_batches = split_batches(csv_bytes, batch_size)
    if not all_batches:
        raise ValueError(f"{source} not landed: it holds a header but no encounters")
    landing_dir.mkdir(parents=True, exist_ok=True)
    done = [int(m.group(1)) for p in landed_files(landing_dir) if (m := BATCH_FILE.match(p.name))]
    start = max(done, default=0)
    batches = all_batches[start:]
    landed = []
    for offset, data in enumerate(batches[:count] if count is not None else batches):
        path = landing_dir / batch_file_name(start + offset + 1)
        write_atomically(path, data)
        landed.append(Landed(path, len(data.splitlines()) - 1))
    return landed
