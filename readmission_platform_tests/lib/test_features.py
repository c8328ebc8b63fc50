import polars as pl

from readmission_platform.lib import schema
from readmission_platform.lib.cleaning import clean
from readmission_platform.lib.features import (
    ENCOUNTER_FEATURES,
    FEATURE_COLUMNS,
    FEATURE_SCHEMA,
    MEDICATION_FEATURES,
    MISSING_CATEGORY,
    UNINFORMATIVE_MEDICATIONS,
    build_features,
)


def raw_row(**values: str) -> dict:
    """A raw encounter with plain values, overridden by `values`."""
    plain = {name: "No" for name in schema.MEDICATIONS} | {
        "encounter_id": "1", "patient_nbr": "10", "race": "Caucasian", "gender": "Female", "age": "[60-70)",
        "weight": "?", "admission_type_id": "1", "discharge_disposition_id": "1", "admission_source_id": "7",
        "time_in_hospital": "3", "payer_code": "MC", "medical_specialty": "Cardiology",
        "num_lab_procedures": "40", "num_procedures": "1", "num_medications": "12",
        "number_outpatient": "0", "number_emergency": "0", "number_inpatient": "0",
        "diag_1": "428", "diag_2": "250.01", "diag_3": "401", "number_diagnoses": "9",
        "max_glu_serum": "None", "A1Cresult": "None", "change": "No", "diabetesMed": "Yes", "readmitted": "NO",
    }  # fmt: skip
    return plain | {"batch_id": "b1"} | values


def features_of(*rows: dict) -> pl.DataFrame:
    raw = pl.DataFrame(rows, schema={name: pl.String for name in (*schema.RAW_COLUMNS, schema.BATCH_ID)}, orient="row")
    return build_features(clean(raw).frame)


def test_columns_are_the_feature_schema(full_clean):
    table = build_features(full_clean.frame)

    assert table.schema == pl.Schema(FEATURE_SCHEMA)
    assert table.height == full_clean.frame.height
    assert table.select(ENCOUNTER_FEATURES).null_count().sum_horizontal().item() == 0


def test_no_identifier_or_label_is_a_feature():
    forbidden = {*schema.IDENTIFIERS, schema.LABEL, schema.LABEL_30D, schema.BATCH_ID}

    assert forbidden.isdisjoint(FEATURE_COLUMNS)
    assert len(set(FEATURE_COLUMNS)) == len(FEATURE_COLUMNS)
    assert set(FEATURE_SCHEMA) == forbidden | set(ENCOUNTER_FEATURES)
    assert "age" not in FEATURE_COLUMNS and "weight" not in FEATURE_COLUMNS


def test_uninformative_medications_are_left_out():
    assert set(MEDICATION_FEATURES) | set(UNINFORMATIVE_MEDICATIONS) == set(schema.MEDICATIONS)
    assert set(UNINFORMATIVE_MEDICATIONS).isdisjoint(FEATURE_COLUMNS)


def test_prior_visits_add_the_three_visit_counts():
    table = features_of(
        raw_row(number_outpatient="2", number_emergency="1", number_inpatient="3"),
        raw_row(encounter_id="2"),
    )
    assert table["prior_visits"].to_list() == [6.0, 0.0]


def test_medication_counts_cover_the_informative_drugs_only():
    table = features_of(
        raw_row(metformin="Steady", insulin="Up", glipizide="Down", examide="Up", troglitazone="Steady"),
        raw_row(encounter_id="2", insulin="Steady"),
        raw_row(encounter_id="3"),
    )
    assert table.select("medications_prescribed", "medication_changes").rows() == [(3.0, 2.0), (1.0, 0.0), (0.0, 0.0)]


def test_weight_recorded_says_whether_a_weight_bracket_was_given():
    table = features_of(raw_row(weight="[75-100)"), raw_row(encounter_id="2", weight="?"))
    assert table["weight_recorded"].to_list() == [1.0, 0.0]


def test_null_categories_become_missing_and_codes_become_text():
    table = features_of(raw_row(race="?", payer_code="?", medical_specialty="?", diag_3="?", A1Cresult=">8"))

    row = table.row(0, named=True)
    assert (row["race"], row["payer_code"], row["medical_specialty"], row["diag_3_group"]) == (MISSING_CATEGORY,) * 4
    assert (row["A1Cresult"], row["max_glu_serum"]) == (">8", "not measured")
    assert (row["admission_type_id"], row["discharge_disposition_id"], row["diag_1_group"]) == ("1", "1", "circulatory")


def test_numeric_features_carry_the_clean_values_and_labels_pass_through():
    table = features_of(raw_row(age="[70-80)", time_in_hospital="5", num_medications="17", readmitted="<30"))

    row = table.row(0, named=True)
    assert (row["age_years"], row["time_in_hospital"], row["num_medications"]) == (75.0, 5.0, 17.0)
    assert (row["encounter_id"], row["patient_nbr"], row["batch_id"]) == (1, 10, "b1")
    assert (row[schema.LABEL], row[schema.LABEL_30D]) == ("<30", True)


def test_no_feature_is_constant_over_the_data_set(full_clean):
    table = build_features(full_clean.frame)
    assert [column for column in ENCOUNTER_FEATURES if table[column].n_unique() == 1] == []


def test_every_feature_is_summed_under_a_field_a_clinician_recognises():
    from readmission_platform.lib.features import HISTORY, by_field, field_of

    raw = set(schema.RAW_SCHEMA)
    for feature in FEATURE_COLUMNS:
        assert field_of(feature) in raw or field_of(feature) in {"visits_in_prior_year", "medications_overall", HISTORY}, feature
    assert field_of("diag_1_group") == "diag_1" and field_of("age_years") == "age" and field_of("insulin") == "insulin"
    assert field_of("history_prior_encounters") == HISTORY and field_of("history_previous_A1Cresult") == HISTORY
    grouped = by_field({"number_inpatient": 0.5, "prior_visits": -0.25, "history_prior_stays": 0.1, "race": 0.0})
    assert grouped == {"visits_in_prior_year": {"number_inpatient": 0.5, "prior_visits": -0.25}, HISTORY: {"history_prior_stays": 0.1}, "race": {"race": 0.0}}
