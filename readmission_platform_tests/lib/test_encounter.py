import json

import pytest
from pydantic import ValidationError

from readmission_platform.lib import schema
from readmission_platform.lib.cleaning import clean_record
from readmission_platform.lib.encounter import (
    FIELDS,
    MAX_BATCH,
    MAX_BATCH_BYTES,
    BatchRequest,
    Encounter,
    _largest_encounter,
    features_frame,
    from_clean,
    out_of_scope,
    record,
)
from readmission_platform.lib.features import ENCOUNTER_FEATURES, build_features, record_features
from readmission_platform.serving.fast.decode import decode_batch
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
    table = build_features(clean_rows).select(ENCOUNTER_FEATURES)
    differing = []
    for index, (row, expected) in enumerate(
        zip(clean_rows.iter_rows(named=True), table.iter_rows(named=True), strict=True)
    ):
        encounter = Encounter.model_validate_json(json.dumps(from_clean(row)))
        features = record_features(clean_record(record(encounter)))
        if {name: features[name] for name in ENCOUNTER_FEATURES} != expected:
            differing.append(index)
    assert clean_rows.height == 99_340
    assert differing == [], f"{len(differing)} rows differ, first {differing[:5]}"


def test_features_frame_of_requests_equals_the_feature_table_rows(full_clean):
    rows = full_clean.frame.head(500)
    requests = [record(Encounter.model_validate(from_clean(row))) for row in rows.iter_rows(named=True)]
    assert features_frame(requests).select(ENCOUNTER_FEATURES).equals(build_features(rows).select(ENCOUNTER_FEATURES))


def test_unknown_fields_may_be_absent_or_null_and_known_ones_are_required():
    sparse = {k: v for k, v in GOOD.items() if schema.CLEAN_BY_NAME[k].nullable is False}
    encounter = Encounter.model_validate(sparse | {"payer_code": None})
    assert record(encounter)["race"] is None and record(encounter)["payer_code"] is None
    assert problems({k: v for k, v in GOOD.items() if k != "insulin"}) == {"insulin": "Field required"}


BAD_VALUES = [
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
        ({"discharge_disposition_id": 31}, "discharge_disposition_id", "Input should be 1"),
        ({"admission_type_id": True}, "admission_type_id", "valid integer"),  # a code is a JSON integer, not true
        ({"admission_source_id": 7.0}, "admission_source_id", "valid integer"),
        ({"request_id": "ward\n7"}, "request_id", "should match pattern"),
        ({"medical_specialty": "Surg\x00ery"}, "medical_specialty", "should match pattern"),  # PostgreSQL refuses a NUL
        ({"medical_specialty": "Surgery\tGeneral"}, "medical_specialty", "should match pattern"),
        ({"gender": None}, "gender", "'Female' or 'Male'"),
        ({"encounter_id": 12}, "encounter_id", "Extra inputs are not permitted"),
        ({"patient_nbr": 12}, "patient_nbr", "Extra inputs are not permitted"),
        ({"glyburide_metformin": "No"}, "glyburide_metformin", "Extra inputs are not permitted"),
]


@pytest.mark.parametrize(("change", "field", "says"), BAD_VALUES)
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


def test_death_or_hospice_is_a_valid_encounter_whose_single_schema_leaves_it_out():
    """Validated as codes, answered by the service (422 alone, per item in a batch); the single route's schema says so."""
    for disposition in schema.DEATH_OR_HOSPICE_DISPOSITIONS:
        assert Encounter.model_validate(GOOD | {"discharge_disposition_id": disposition}).discharge_disposition_id == disposition
        decoded = decode_batch(json.dumps({"encounters": [GOOD, GOOD | {"discharge_disposition_id": disposition}]}).encode())
        assert decoded["discharge_disposition_id"].to_list() == [GOOD["discharge_disposition_id"], disposition]
    single = Encounter.model_json_schema()["properties"]["discharge_disposition_id"]
    assert not set(single["enum"]) & set(schema.DEATH_OR_HOSPICE_DISPOSITIONS) and "422" in single["description"]
    item = BatchRequest.model_json_schema()["$defs"]["BatchEncounter"]["properties"]["discharge_disposition_id"]
    assert set(item["enum"]) == set(schema.DISCHARGE_DISPOSITION_IDS)
    assert "died or went to hospice" in out_of_scope(11)


def test_nullable_fields_are_declared_nullable_for_openapi_3_0():
    properties = Encounter.model_json_schema()["properties"]
    assert properties["race"]["nullable"] is True and None in properties["race"]["enum"]
    assert properties["request_id"]["nullable"] is True and properties["request_id"]["pattern"] == "^[ -~]+$"
    assert "nullable" not in properties["gender"] and "anyOf" not in str(properties)


def test_the_body_cap_fits_a_full_batch_of_the_largest_encounters():
    largest = json.dumps({"encounters": [_largest_encounter()] * MAX_BATCH}, indent=1).encode()
    BatchRequest.model_validate_json(json.dumps({"encounters": [_largest_encounter() | {"diag_1": "E123.45",
        "diag_2": "V12.34", "diag_3": "250.02", "payer_code": "MC"}]}))  # fmt: skip
    assert len(largest) < MAX_BATCH_BYTES < 100_000_000
