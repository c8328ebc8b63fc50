"""The encounter source: the bundled UCI data set, checksum-verified, or a CSV export of the same schema."""

from __future__ import annotations

import hashlib
import zipfile
import zlib
from importlib import resources
from pathlib import Path

BUNDLED_ZIP_SHA256 = "3a17a3b55b6dd4a1926703185c0ad8e2ed30bc8e2f9b927cdd1000b733d1de8e"
BUNDLED_CSV_MEMBER = "dataset_diabetes/diabetic_data.csv"
BUNDLED_CSV_SHA256 = "0689e7ec031237dc63031b938805c48377748761a3b26acab621567afa24df97"


class SourceError(ValueError):
    """The source file is missing, corrupt or not of the expected schema."""


def bundled_source() -> Path:
    """Path of the data set shipped inside the package."""
    return Path(str(resources.files("readmission_platform") / "data" / "dataset_diabetes.zip"))


def _verified(data: bytes, expected: str, what: str) -> bytes:
    actual = hashlib.sha256(data).hexdigest()
    if actual != expected:
        raise SourceError(f"{what} has sha256 {actual}; expected {expected} (the file is damaged or was replaced)")
    return data


def read_source_bytes(path: Path | None = None) -> bytes:
    """The source CSV's bytes; the bundled zip and its CSV are checked against their published checksums."""
    path = path or bundled_source()
    if not path.exists():
        raise SourceError(f"source {path} does not exist; expected the data set zip or a CSV export")
    if path.suffix.lower() != ".zip":
        return path.read_bytes()
    data = path.read_bytes()
    is_bundled = hashlib.sha256(data).hexdigest() == BUNDLED_ZIP_SHA256 or path == bundled_source()
    if is_bundled:
        _verified(data, BUNDLED_ZIP_SHA256, str(path))
    try:
        with zipfile.ZipFile(path) as archive:
            members = [n for n in archive.namelist() if n.endswith(".csv") and not n.endswith("IDs_mapping.csv")]
            member = BUNDLED_CSV_MEMBER if BUNDLED_CSV_MEMBER in members else (members[0] if len(members) == 1 else None)
            if member is None:
                raise SourceError(f"{path} holds {members or 'no CSV'}; expected exactly one encounter CSV")
            csv_bytes = archive.read(member)
    except (zipfile.BadZipFile, zlib.error) as error:
        raise SourceError(f"{path} is not a readable zip archive ({error}); the file is damaged or not a zip") from None
    if is_bundled:
        _verified(csv_bytes, BUNDLED_CSV_SHA256, f"{path}:{member}")
    return csv_bytes
