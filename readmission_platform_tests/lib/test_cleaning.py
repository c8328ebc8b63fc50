from datetime import UTC, datetime

import polars as pl
import pytest

from readmission_platform.lib import schema
from readmission_platform.lib.cleaning import age_years, clean, icd9_group
from readmission_platform.lib.ingest import parse_batch


@pytest.fixture(scope="module")
def base_row(sample_source_bytes) -> dict:
    """The first real encounter as a raw row (disposition 25, Female, '[0-10)', A1Cresult 'None')."""
    parsed = parse_batch(
        sample_source_bytes,
        batch_id="b1",
        source_file="sample.csv",
        loaded_elsewhere=pl.DataFrame(schema={"encounter_id": pl.Int64, schema.BATCH_ID: pl.String}),
        now=datetime(2024, 1, 1, tzinfo=UTC),
    )
    return parsed.rows.row(0, named=True)


def raw_rows(base_row: dict, *changes: dict) -> pl.DataFrame:
    """One raw row per change, each a copy of the base row with its own encounter_id."""
    rows = [base_row | {"encounter_id": str(n)} | change for n, change in enumerate(changes, start=1)]
    return pl.DataFrame(rows, schema=schema.RAW_SCHEMA, orient="row")


def groups(codes: list[str | None]) -> list[str | None]:
    frame = pl.DataFrame({"code": codes}, schema={"code": pl.String})
    return frame.select(icd9_group(pl.col("code")).alias("group"))["group"].to_list()


@pytest.mark.parametrize(
    ("code", "group"),
    [
        ("250", "diabetes"),
        ("250.83", "diabetes"),
        ("250.01", "diabetes"),
        ("249.9", "other"),
        ("251", "other"),
        ("390", "circulatory"),
        ("459", "circulatory"),
        ("459.9", "circulatory"),
        ("389.9", "other"),
        ("460", "respiratory"),
        ("519.9", "respiratory"),
        ("520", "digestive"),
        ("579", "digestive"),
        ("785", "circulatory"),
        ("786", "respiratory"),
        ("787", "digestive"),
        ("788", "genitourinary"),
        ("580", "genitourinary"),
        ("629", "genitourinary"),
        ("630", "other"),
        ("140", "neoplasms"),
        ("239", "neoplasms"),
        ("139", "other"),
        ("240", "other"),
        ("710", "musculoskeletal"),
        ("739", "musculoskeletal"),
        ("709.9", "other"),
        ("740", "other"),
        ("800", "injury"),
        ("999", "injury"),
        ("799", "other"),
        ("V57", "other"),
        ("V45.81", "other"),
        ("E909", "other"),
        ("8", "other"),
        ("42", "other"),
        (None, None),
    ],
)
def test_icd9_group_boundaries(code, group):
    assert groups([code]) == [group]


def test_icd9_groups_are_derived_for_each_diagnosis_and_missing_stays_missing(base_row):
    frame = clean(raw_rows(base_row, {"diag_1": "250.83", "diag_2": "V57", "diag_3": "?"})).frame

    assert frame.select("diag_1_group", "diag_2_group", "diag_3_group").row(0) == ("diabetes", "other", None)
    assert frame["diag_3"][0] is None


def test_every_group_the_full_data_yields_is_declared(full_clean):
    for i in (1, 2, 3):
        assert set(full_clean.frame[f"diag_{i}_group"].drop_nulls()) == set(schema.ICD9_GROUPS)


def test_age_bracket_becomes_its_middle_year():
    brackets = pl.Series("age", [*schema.AGE_BRACKETS, "[100-110)", "70-80", None])
    years = pl.select(age_years(pl.lit(brackets)))["age"].to_list()
    assert years == [5, 15, 25, 35, 45, 55, 65, 75, 85, 95, None, None, None]


def test_unknown_age_bracket_is_kept_with_no_age_years(base_row):
    frame = clean(raw_rows(base_row, {"age": "[100-110)"}, {"age": "[90-100)"})).frame
    assert frame.select("age", "age_years").rows() == [("[100-110)", None), ("[90-100)", 95)]


def test_none_means_not_measured_and_question_mark_means_missing(base_row):
    frame = clean(
        raw_rows(
            base_row,
            {"A1Cresult": "None", "max_glu_serum": "None"},
            {"A1Cresult": "?", "max_glu_serum": "?", "race": "?", "weight": "?", "payer_code": "?"},
            {"A1Cresult": ">8", "max_glu_serum": "Norm", "race": "None", "weight": "[75-100)", "payer_code": "MC"},
        )
    ).frame

    assert frame.select("A1Cresult", "max_glu_serum", "race", "weight", "payer_code").rows() == [
        ("not measured", "not measured", "Caucasian", None, None),
        (None, None, None, None, None),
        (">8", "Norm", "None", "[75-100)", "MC"),
    ]


def test_full_data_keeps_none_as_a_category(full_raw, full_clean):
    kept = full_raw.join(full_clean.frame.select(pl.col("encounter_id").cast(pl.String)), on="encounter_id")
    for column in ("A1Cresult", "max_glu_serum"):
        assert full_clean.frame[column].null_count() == 0
        assert (full_clean.frame[column] == "not measured").sum() == (kept[column] == "None").sum() > 80_000


def test_values_are_typed_and_padded_text_is_trimmed(base_row):
    frame = clean(raw_rows(base_row, {"encounter_id": " 42 ", "time_in_hospital": " 3", "gender": "Male "})).frame

    assert frame.schema == pl.Schema(schema.CLEAN_SCHEMA)
    assert frame.select("encounter_id", "patient_nbr", "time_in_hospital", "gender", "batch_id").row(0) == (
        42, int(base_row["patient_nbr"]), 3, "Male", "b1"
    )


def test_unparseable_number_becomes_null_and_the_row_is_kept(base_row):
    frame = clean(raw_rows(base_row, {"time_in_hospital": "three"})).frame
    assert frame.height == 1
    assert frame["time_in_hospital"][0] is None


@pytest.mark.parametrize("disposition", schema.DEATH_OR_HOSPICE_DISPOSITIONS)
def test_death_or_hospice_discharge_is_dropped(base_row, disposition):
    result = clean(raw_rows(base_row, {"discharge_disposition_id": str(disposition)}, {"discharge_disposition_id": "1"}))

    assert result.frame["discharge_disposition_id"].to_list() == [1]
    assert result.dropped == {"death_or_hospice": 1, "invalid_gender": 0}


@pytest.mark.parametrize("disposition", ["10", "12", "18", "22", "?"])
def test_other_discharges_are_kept(base_row, disposition):
    result = clean(raw_rows(base_row, {"discharge_disposition_id": disposition}))
    assert result.frame.height == 1
    assert result.dropped == {"death_or_hospice": 0, "invalid_gender": 0}


def test_invalid_gender_is_dropped_and_counted_once_when_also_a_death(base_row):
    result = clean(
        raw_rows(
            base_row,
            {"gender": "Unknown/Invalid"},
            {"gender": "Unknown/Invalid", "discharge_disposition_id": "11"},
            {"gender": "?"},
            {"gender": "Male"},
        )
    )
    assert result.frame["encounter_id"].to_list() == [3, 4]
    assert result.dropped == {"death_or_hospice": 1, "invalid_gender": 1}


def test_label_is_readmission_within_30_days(base_row):
    frame = clean(raw_rows(base_row, {"readmitted": "<30"}, {"readmitted": ">30"}, {"readmitted": "NO"})).frame
    assert frame[schema.LABEL_30D].to_list() == [True, False, False]


def test_full_data_set_keeps_99340_encounters(full_clean):
    frame = full_clean.frame

    assert frame.height == 99_340
    assert full_clean.dropped == {"death_or_hospice": 2_423, "invalid_gender": 3}
    assert frame["patient_nbr"].n_unique() == 69_987
    assert not frame["discharge_disposition_id"].is_in(schema.DEATH_OR_HOSPICE_DISPOSITIONS).any()
    assert set(frame["gender"]) == {"Female", "Male"}
    assert frame[schema.LABEL_30D].sum() == (frame[schema.LABEL] == "<30").sum()
    assert frame.schema == pl.Schema(schema.CLEAN_SCHEMA)


def test_full_data_drops_match_each_disposition(full_raw, full_clean):
    per_disposition = full_raw.filter(
        pl.col("discharge_disposition_id").cast(pl.Int16).is_in(schema.DEATH_OR_HOSPICE_DISPOSITIONS)
    ).height
    assert per_disposition == full_clean.dropped["death_or_hospice"]
