import csv

import polars as pl

from readmission_platform.lib import schema


def test_raw_columns_are_the_real_header_in_order(full_source_bytes):
    header = next(csv.reader([full_source_bytes.splitlines()[0].decode("utf-8")]))
    assert list(schema.RAW_COLUMNS) == header
    assert len(schema.RAW_COLUMNS) == 50


def test_clean_columns_are_the_raw_columns_plus_the_derived_ones():
    names = [c.name for c in schema.CLEAN_COLUMNS]
    assert len(names) == len(set(names))
    assert set(names) - set(schema.RAW_COLUMNS) == schema.DERIVED
    assert list(schema.CLEAN_SCHEMA) == [schema.BATCH_ID, *names]
    assert list(schema.RAW_SCHEMA) == [schema.BATCH_ID, *schema.RAW_COLUMNS, *schema.RAW_LINEAGE]
    assert all(schema.RAW_SCHEMA[name] == pl.String() for name in schema.RAW_COLUMNS)


def test_enumerations_match_the_data_set_codes():
    assert schema.AGE_BRACKETS == tuple(f"[{lo}-{lo + 10})" for lo in range(0, 100, 10))
    assert set(schema.DEATH_OR_HOSPICE_DISPOSITIONS) <= set(schema.DISCHARGE_DISPOSITION_IDS)
    assert 16 not in schema.ADMISSION_SOURCE_IDS
    assert len(schema.MEDICATIONS) == 23


def test_icd9_pattern_accepts_the_data_set_spellings_only():
    for code in ("250.83", "250", "8", "42", "V57", "V45.81", "E909", "E878.1"):
        assert schema.ICD9_PATTERN.match(code), code
    for code in ("250.831", "2500", "V", "E90", "X12", "", "250.", "?"):
        assert not schema.ICD9_PATTERN.match(code), code


def test_expected_values_say_what_a_column_may_hold():
    assert schema.expected_values(schema.CLEAN_BY_NAME["age"]).startswith("one of [0-10), [10-20)")
    assert schema.expected_values(schema.CLEAN_BY_NAME["time_in_hospital"]) == "an integer from 1 to 14"
    assert schema.expected_values(schema.CLEAN_BY_NAME["payer_code"]) == "text matching ^[A-Z]{2}$"
    assert schema.expected_values(schema.CLEAN_BY_NAME["medical_specialty"]) == "text"
