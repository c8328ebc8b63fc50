import json

import polars as pl
import pytest
from pydantic import ValidationError

from readmission_platform.lib import schema
from readmission_platform.lib.cleaning import clean_record
from readmission_platform.lib.encounter import (
    FIELDS,
    MAX_BATCH,
    MAX_BATCH_BYTES,
    REQUEST_ID,
    BatchRequest,
    Encounter,
    _largest_encounter,
    columns,
    decode_batch,
    features_frame,
    from_clean,
    out_of_scope,
    record,
    typed_frame,
)
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
        ({"request_id": "ward\n7"}, "request_id", "should match pattern"),
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


def batch_body(*encounters: dict, **top) -> bytes:
    return json.dumps({"encounters": list(encounters)} | top).encode()


def test_the_batch_decoder_gives_what_the_request_model_gives_for_every_encounter_of_the_data_set(full_clean, caplog):
    requests = [from_clean(row) | ({"request_id": f"r{i}"} if i % 3 else {}) for i, row in enumerate(full_clean.frame.iter_rows(named=True))]
    for start in range(0, len(requests), MAX_BATCH):
        body = batch_body(*requests[start : start + MAX_BATCH])
        expected = BatchRequest.model_validate_json(body).encounters
        decoded = decode_batch(body)
        assert decoded.select(FIELDS).equals(typed_frame(columns(expected)))
        assert decoded[REQUEST_ID].to_list() == [e.request_id for e in expected]
    assert "refused a body the request model accepts" not in caplog.text  # the fast path took every one


BAD_IN_A_BATCH = [
    *[(change, field) for change, field, _ in BAD_VALUES],
    ({"diag_1": "428\n"}, "diag_1"),  # "$" of Python's re matches before a final newline; the request model's does not
    ({"medical_specialty": " Surgery-General"}, "medical_specialty"),  # training text was stripped: refuse, not guess
    ({"medical_specialty": "x" * 101}, "medical_specialty"),
    ({"time_in_hospital": True}, "time_in_hospital"),
    ({"time_in_hospital": 3.0}, "time_in_hospital"),
    ({"number_inpatient": 10**30}, "number_inpatient"),
    ({"request_id": ""}, "request_id"),
    ({"request_id": "r" * 129}, "request_id"),
    *[({"request_id": f"r{c}1"}, "request_id") for c in ("\x00", "\r", "\x1b[31m", "\x7f", "é")],
]


@pytest.mark.parametrize(("change", "field"), BAD_IN_A_BATCH, ids=[f"{f}={c[f]!r}"[:40] for c, f in BAD_IN_A_BATCH])
def test_the_batch_decoder_refuses_what_the_request_model_refuses_and_names_row_and_field(change, field):
    with pytest.raises(ValidationError) as raised:
        decode_batch(batch_body(GOOD, GOOD | change))
    assert [e["loc"] for e in raised.value.errors()] == [("encounters", 1, field)]


@pytest.mark.parametrize(
    ("body", "location"),
    [
        (batch_body(), ("encounters",)),
        (batch_body(*[GOOD] * (MAX_BATCH + 1)), ("encounters",)),
        (batch_body(GOOD, patients=3), ("patients",)),
        (json.dumps([GOOD]).encode(), ()),
        (b'{"encounters": [', ()),
    ],
    ids=["no encounters", "too many", "extra key", "a list", "malformed"],
)
def test_a_body_that_is_no_batch_request_is_refused_saying_where(body, location):
    with pytest.raises(ValidationError) as raised:
        decode_batch(body)
    assert raised.value.errors()[0]["loc"] == location


def test_absent_unknown_fields_are_null_in_the_batch_and_request_ids_are_kept():
    sparse = {k: v for k, v in GOOD.items() if not schema.CLEAN_BY_NAME[k].nullable}
    decoded = decode_batch(batch_body(sparse, GOOD | {"request_id": "ward-7"}))
    assert decoded["race"].to_list() == [None, GOOD["race"]] and decoded[REQUEST_ID].to_list() == [None, "ward-7"]
    assert decoded.schema["time_in_hospital"] == pl.Int64 and decoded.schema["age"] == pl.String


def test_a_body_the_fast_decoder_refuses_but_the_request_model_accepts_is_served_and_warned_about(monkeypatch, caplog):
    import msgspec

    from readmission_platform.lib import encounter

    monkeypatch.setattr(encounter, "_BATCH", msgspec.json.Decoder(int))  # a fast path that refuses everything
    body = batch_body(GOOD, GOOD | {"request_id": "r2"})
    decoded = decode_batch(body)
    assert decoded.select(FIELDS).equals(typed_frame([GOOD, GOOD])) and decoded[REQUEST_ID].to_list() == [None, "r2"]
    assert "refused a body the request model accepts" in caplog.text


def test_death_or_hospice_is_a_valid_encounter_whose_single_schema_leaves_it_out():
    """Validated as codes, answered by the service (422 alone, per item in a batch); the single route's schema says so."""
    for disposition in schema.DEATH_OR_HOSPICE_DISPOSITIONS:
        assert Encounter.model_validate(GOOD | {"discharge_disposition_id": disposition}).discharge_disposition_id == disposition
        decoded = decode_batch(batch_body(GOOD, GOOD | {"discharge_disposition_id": disposition}))
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
