import csv

import polars as pl

from readmission_platform.lib import schema


def test_raw_columns_are_the_real_header_in_order(full_source_bytes):
    header = next(csv.reader([full_source_bytes.splitlines()[0].decode("utf-8")]))
    assert list(schema.RAW_COLUMNS) == header


def test_clean_columns_are_named_once_and_derived_from_raw_columns():
    names = [c.name for c in schema.CLEAN_COLUMNS]
    assert len(names) == len(set(names))
    assert {c.derived_from for c in schema.CLEAN_COLUMNS if c.derived_from} <= set(schema.RAW_COLUMNS)


def test_enumerations_are_the_values_the_data_set_holds(full_raw):
    statuses = {name for name in schema.RAW_COLUMNS if set(full_raw[name]) <= set(schema.MEDICATION_STATUSES)}
    assert statuses == set(schema.MEDICATIONS)
    assert set(full_raw["age"]) == set(schema.AGE_BRACKETS)
    assert set(full_raw["admission_source_id"].cast(pl.Int16)) <= set(schema.ADMISSION_SOURCE_IDS)
    assert set(schema.DEATH_OR_HOSPICE_DISPOSITIONS) <= set(schema.DISCHARGE_DISPOSITION_IDS)


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
