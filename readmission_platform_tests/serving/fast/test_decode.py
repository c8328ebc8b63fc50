import json

import polars as pl
import pytest
from pydantic import ValidationError

from readmission_platform.lib import schema
from readmission_platform.lib.encounter import FIELDS, MAX_BATCH, REQUEST_ID, BatchRequest, columns, from_clean, typed_frame
from readmission_platform.serving.contract import invalid
from readmission_platform.serving.fast.decode import NAMED_UNKNOWN_KEYS, decode_batch
from readmission_platform_tests.lib.test_encounter import BAD_VALUES, GOOD


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

    from readmission_platform.serving.fast import decode

    monkeypatch.setattr(decode, "_BATCH", msgspec.json.Decoder(int))  # a fast path that refuses everything
    body = batch_body(GOOD, GOOD | {"request_id": "r2"})
    decoded = decode_batch(body)
    assert decoded.select(FIELDS).equals(typed_frame([GOOD, GOOD])) and decoded[REQUEST_ID].to_list() == [None, "r2"]
    assert "refused a body the request model accepts" in caplog.text


def test_a_flood_of_unknown_keys_is_counted_and_only_the_first_of_each_object_validated():
    flood = {f"x{i}": 1 for i in range(50_000)}
    body = json.dumps({"encounters": [GOOD | flood, GOOD], **{f"y{i}": 1 for i in range(15)}}).encode()

    with pytest.raises(ValidationError) as raised:
        decode_batch(body)

    error = raised.value
    named = [e["loc"] for e in error.errors()]
    assert sorted(named) == sorted([*[(f"y{i}",) for i in range(NAMED_UNKNOWN_KEYS)],
                                    *[("encounters", 0, f"x{i}") for i in range(NAMED_UNKNOWN_KEYS)]])  # fmt: skip
    assert error.unvalidated_keys == 50_000 + 15 - 2 * NAMED_UNKNOWN_KEYS
    answer = json.loads(invalid(error).body)
    assert answer["error"] == f"50015 validation errors for BatchRequest (the first {2 * NAMED_UNKNOWN_KEYS} listed)"
