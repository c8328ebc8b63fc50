"""What the data set's codes mean: the descriptions of IDs_mapping.csv, shipped in the bundled zip beside the encounters.

The file holds three tables one after another (admission type, discharge disposition, admission source), each under a
header `<column>,description` and ended by a line of a lone comma.
"""

from __future__ import annotations

import csv
import io
import zipfile
from functools import cache

from readmission_platform.lib import schema
from readmission_platform.lib.source import BUNDLED_ZIP_SHA256, SourceError, _verified, bundled_source

MAPPING_MEMBER = "dataset_diabetes/IDs_mapping.csv"
CODED_COLUMNS = ("admission_type_id", "discharge_disposition_id", "admission_source_id")


def parse_mapping(text: str) -> dict[str, dict[int, str]]:
    """IDs_mapping.csv's text → {column: {code: description}}; SourceError naming a line that is neither a header, a
    code with its description, nor a separator."""
    tables: dict[str, dict[int, str]] = {}
    current: dict[int, str] | None = None
    for number, row in enumerate(csv.reader(io.StringIO(text)), start=1):
        cells = [cell.strip() for cell in row]
        if not any(cells):
            current = None
        elif len(cells) == 2 and cells[1] == "description":
            current = tables.setdefault(cells[0], {})
        elif current is not None and len(cells) == 2 and cells[0].isdigit():
            current[int(cells[0])] = cells[1]
        else:
            raise SourceError(f"IDs_mapping.csv line {number} is {row!r}; expected '<column>,description', "
                              "'<code>,<description>' or ','")  # fmt: skip
    if missing := [column for column in CODED_COLUMNS if column not in tables]:
        raise SourceError(f"IDs_mapping.csv has no table for {missing}; expected {list(CODED_COLUMNS)}")
    return tables


@cache
def code_descriptions() -> dict[str, dict[int, str]]:
    """{column: {code: description}} for every code the schema allows, from the bundled (checksum-verified) zip; a
    code the file describes as NULL says so in words."""
    path = bundled_source()
    data = _verified(path.read_bytes(), BUNDLED_ZIP_SHA256, str(path))
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        tables = parse_mapping(archive.read(MAPPING_MEMBER).decode("utf-8"))
    described = {}
    for column in CODED_COLUMNS:
        table = tables[column]
        described[column] = {
            code: "not recorded" if table.get(code, "NULL") == "NULL" else table[code]
            for code in schema.CLEAN_BY_NAME[column].allowed
        }
    return described
