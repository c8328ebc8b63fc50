"""The meanings of the data set's codes, from IDs_mapping.csv in the bundled zip."""

from __future__ import annotations

import pytest

from readmission_platform.lib import schema
from readmission_platform.lib.codes import CODED_COLUMNS, code_descriptions, parse_mapping
from readmission_platform.lib.source import SourceError


def test_every_code_the_schema_allows_has_its_meaning():
    described = code_descriptions()
    for column in CODED_COLUMNS:
        assert set(described[column]) == set(schema.CLEAN_BY_NAME[column].allowed)
    assert described["admission_type_id"][1] == "Emergency"
    assert described["admission_type_id"][6] == "not recorded"  # NULL in the file
    assert described["discharge_disposition_id"][11] == "Expired"
    assert described["admission_source_id"][7] == "Emergency Room"  # the file's leading space dropped


def test_a_line_of_another_shape_is_named():
    with pytest.raises(SourceError, match=r"line 3 is \['2', 'Urgent', 'extra'\]"):
        parse_mapping("admission_type_id,description\n1,Emergency\n2,Urgent,extra\n")


def test_a_missing_table_is_named():
    with pytest.raises(SourceError, match=r"no table for \['discharge_disposition_id', 'admission_source_id'\]"):
        parse_mapping("admission_type_id,description\n1,Emergency\n,\n")
