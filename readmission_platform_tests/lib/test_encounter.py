import json

import pytest
from pydantic import ValidationError

from readmission_platform.lib import schema
from readmission_platform.lib.cleaning import clean_record
from readmission_platform.lib.encounter import FIELDS, Encounter, features_frame, from_clean, record
from readmission_platform.lib.features import FEATURE_COLUMNS, build_features, record_features
from readmission_platform.serving.model import SMOKE_ENCOUNTERS

GOOD = dict(SMOKE_ENCOUNTERS[0])


def problems(body: dict) -> dict[str, str]:
    with pytest.raises(ValidationError) as raised:
        Encounter.model_validate_json(json.dumps(body))
    return {".".join(map(str, e["loc"])): e["msg"] for e in raised.value.errors()}


def test_fields_are_the_data_set_columns_without_identifiers_and_label():
    assert set(FIELDS) == set(schema.RAW_COLUMNS) - {*schema.IDENTIFIERS, schema.LABEL}
    aliases = {field.alias or name for name, field in Encounter.model_fields.items()}
    assert {"A1Cresult", "glyburide-metformin", "diabetesMed", "request_id"} <= aliases
    assert not aliases & {*schema.IDENTIFIERS, schema.LABEL, schema.LABEL_30D, "age_years"}


def test_every_encounter_of_the_data_set_is_accepted_and_its_features_equal_the_feature_table(full_clean):
    """The single-encounter path (request → clean_record → record_features) against the batch path, all 99,340 rows."""
    clean_rows = full_clean.frame
    table = build_features(clean_rows).select(FEATURE_COLUMNS)
    differing = []
    for index, (row, expected) in enumerate(
        zip(clean_rows.iter_rows(named=True), table.iter_rows(named=True), strict=True)
    ):
        encounter = Encounter.model_validate_json(json.dumps(from_clean(row)))
        if record_features(clean_record(record(encounter))) != expected:
            differing.append(index)
    assert clean_rows.height == 99_340
    assert differing == [], f"{len(differing)} rows differ, first {differing[:5]}"


def test_features_frame_of_requests_equals_the_feature_table_rows(full_clean):
    rows = full_clean.frame.head(500)
    requests = [record(Encounter.model_validate(from_clean(row))) for row in rows.iter_rows(named=True)]
    assert features_frame(requests).select(FEATURE_COLUMNS).equals(build_features(rows).select(FEATURE_COLUMNS))


def test_unknown_fields_may_be_absent_or_null_and_known_ones_are_required():
    sparse = {k: v for k, v in GOOD.items() if schema.CLEAN_BY_NAME[k].nullable is False}
    encounter = Encounter.model_validate(sparse | {"payer_code": None})
    assert record(encounter)["race"] is None and record(encounter)["payer_code"] is None
    assert problems({k: v for k, v in GOOD.items() if k != "insulin"}) == {"insulin": "Field required"}


@pytest.mark.parametrize(
    ("change", "field", "says"),
    [
        ({"age": "[100-110)"}, "age", "'[90-100)'"),
        ({"gender": "Unknown/Invalid"}, "gender", "'Female' or 'Male'"),
        ({"time_in_hospital": "3"}, "time_in_hospital", "valid integer"),
        ({"time_in_hospital": 3.5}, "time_in_hospital", "valid integer"),
        ({"time_in_hospital": 15}, "time_in_hospital", "less than or equal to 14"),
        ({"num_medications": -1}, "num_medications", "greater than or equal to 0"),
        ({"diag_1": "ABC"}, "diag_1", "should match pattern"),
        ({"payer_code": "medicare"}, "payer_code", "should match pattern"),
        ({"A1Cresult": "high"}, "A1Cresult", "'None', 'Norm', '>7' or '>8'"),
        ({"metformin": "Yes"}, "metformin", "'No', 'Steady', 'Up' or 'Down'"),
        ({"admission_source_id": 16}, "admission_source_id", "Input should be 1"),
        ({"discharge_disposition_id": 11}, "discharge_disposition_id", "died or went to hospice"),
        ({"gender": None}, "gender", "'Female' or 'Male'"),
        ({"encounter_id": 12}, "encounter_id", "Extra inputs are not permitted"),
        ({"patient_nbr": 12}, "patient_nbr", "Extra inputs are not permitted"),
        ({"glyburide_metformin": "No"}, "glyburide_metformin", "Extra inputs are not permitted"),
    ],
)
def test_each_bad_value_is_named_with_what_was_expected(change, field, says):
    found = problems(GOOD | change)
    assert list(found) == [field]
    assert says in found[field]


def test_every_offending_field_is_named_at_once():
    found = problems(GOOD | {"age": "old", "race": "Martian", "weight": 80})
    assert set(found) == {"age", "race", "weight"}


def test_request_id_is_optional_and_echoed():
    assert Encounter.model_validate(GOOD).request_id is None
    assert Encounter.model_validate(GOOD | {"request_id": "abc-1"}).request_id == "abc-1"
    assert "request_id" not in record(Encounter.model_validate(GOOD | {"request_id": "abc-1"}))
