"""What the app's pages show, without Streamlit or a service: the form, the words, the batch checks, the model card."""

from __future__ import annotations

import polars as pl
import pytest

from readmission_platform.app.answers import UP, contributions_frame, explained_elsewhere, risk_in_words
from readmission_platform.app.batch import UploadError, check_rows, read_upload
from readmission_platform.app.card import figure, metrics_table, table
from readmission_platform.app.form import diagnosis_group, encounter_request, form_fields, reference_frame
from readmission_platform.app.history import AWAITED, SHOWN, filtered, read_recent, recent_predictions
from readmission_platform.lib import schema
from readmission_platform.lib.encounter import FIELDS, Encounter


@pytest.fixture(scope="module")
def fields(sample_source_bytes):
    return {f.name: f for f in form_fields(reference_frame(sample_source_bytes))}


def test_the_forms_defaults_make_a_request_the_service_accepts(fields):
    request = encounter_request({name: f.default for name, f in fields.items()})
    Encounter.model_validate(request)
    assert fields["number_inpatient"].default == 0 and fields["insulin"].kind == "choice"


def test_choices_are_the_schemas_values_with_their_meaning(fields):
    disposition = fields["discharge_disposition_id"]
    assert not set(disposition.options) & set(schema.DEATH_OR_HOSPICE_DISPOSITIONS)
    assert disposition.describe(1) == "1 · Discharged to home"
    assert fields["A1Cresult"].describe("None") == "None · not measured"
    assert fields["race"].options[0] is None and fields["race"].describe(None) == "unknown"
    assert set(fields["age"].options) == set(schema.AGE_BRACKETS)


def test_a_diagnosis_shows_its_group_or_what_is_wrong():
    assert diagnosis_group("250.02") == "group: diabetes"
    assert diagnosis_group("V57") == "group: other"
    assert "is not an ICD-9 code" in diagnosis_group("heart")
    assert diagnosis_group("  ") == "no diagnosis entered"


def test_empty_text_is_unknown_and_the_patient_id_is_sent_only_when_given(fields):
    values = {name: f.default for name, f in fields.items()} | {"medical_specialty": "  ", "diag_3": ""}
    request = encounter_request(values)
    assert request["medical_specialty"] is None and request["diag_3"] is None and "patient_id" not in request
    assert encounter_request(values, " 4711 ")["patient_id"] == "4711"


@pytest.mark.parametrize(
    ("band", "said"),
    [("high", "**High risk**: a 30.0 % probability"), ("medium", "usual rate is 11.0 %"), ("low", "**Low risk**")],
)
def test_the_risk_in_words_names_the_threshold_and_the_usual_rate(band, said):
    words = risk_in_words({"probability": 0.3, "threshold": 0.2, "risk_band": band}, 0.11)
    assert said in words
    assert ("20.0 %" in words) == (band != "low")


def test_an_explanation_of_another_version_than_the_answers_says_so():
    canary = {"model_version": "3", "stage": "canary", "probability": 0.21}
    production = {"model_version": "2", "stage": "production", "probability": 0.084}
    assert explained_elsewhere(canary, production) == (
        "This explains version 2 (production), which gives this encounter 8.4 %; the risk above is version 3's (canary)."
    )
    assert explained_elsewhere(production, production) is None


def test_contributions_strongest_first_per_field_when_the_service_sums_them():
    explanation = {
        "contributions": [{"feature": "number_inpatient", "value": 3.0, "contribution": 0.4},
                          {"feature": "age_years", "value": 75.0, "contribution": -0.1}],
        "fields": [{"field": "age", "contribution": -0.1, "features": ["age_years"]},
                   {"field": "number_inpatient", "contribution": 0.4, "features": ["number_inpatient"]}],
    }  # fmt: skip
    by_feature = contributions_frame({"contributions": explanation["contributions"]})
    assert by_feature["value"].to_list() == ["3", "75"] and by_feature["direction"][0] == UP
    by_field = contributions_frame(explanation, {"age": "[70-80)", "number_inpatient": 3})
    assert by_field["feature"].to_list() == ["Inpatient stays, past year", "Age (years)"]
    assert by_field["value"].to_list() == ["3", "[70-80)"]


def test_each_bad_row_is_named_in_words(sample_source_bytes):
    lines = sample_source_bytes.decode().splitlines()[:5]
    header = lines[0].split(",")
    cells = lines[2].split(",")
    cells[header.index("num_lab_procedures")] = "many"
    cells[header.index("gender")] = ""
    lines[2] = ",".join(cells)
    cells = lines[3].split(",")
    cells[header.index("discharge_disposition_id")] = "11"
    lines[3] = ",".join(cells)
    checked = check_rows(read_upload("\n".join(lines).encode()))
    assert checked.valid == 2
    assert checked.problems[1] == ("line 3: 'gender' holds None; expected one of Female, Male; 'num_lab_procedures' "
                                   "holds 'many'; expected an integer from 0 to 300")  # fmt: skip
    assert checked.problems[2].startswith("line 4: discharge disposition 11 is death or hospice")


@pytest.mark.parametrize(("text", "valid"), [("1_0", False), ("\u0664\u0664", False), ("10", True), (" 10 ", True), ("+10", True)])
def test_a_number_is_read_as_ingestion_reads_it(sample_source_bytes, text, valid):
    lines = sample_source_bytes.decode().splitlines()[:3]
    header, cells = lines[0].split(","), lines[1].split(",")
    cells[header.index("time_in_hospital")] = text
    lines[1] = ",".join(cells)
    checked = check_rows(read_upload("\n".join(lines).encode()))
    assert (checked.valid, any(checked.problems)) == ((2, False) if valid else (1, True)), checked.problems


def test_a_file_that_is_not_an_export_is_refused_whole():
    with pytest.raises(UploadError, match="is empty"):
        read_upload(b"")
    with pytest.raises(UploadError, match="not UTF-8"):
        read_upload(b"\xff\xfe")
    with pytest.raises(UploadError, match="has no column race, gender"):
        read_upload(b"a,b\n1,2\n")


def test_the_model_card_shows_intervals_and_tables_it_is_given():
    assert figure({"estimate": 0.66, "lower": 0.64, "upper": 0.68}) == "0.660 (0.640 to 0.680)"
    metrics = metrics_table({"test_metrics": {"roc_auc": 0.66}, "validation_metrics": {"roc_auc": 0.7, "brier": 0.09}})
    assert metrics.rows() == [("brier", "", "0.090"), ("roc_auc", "0.660", "0.700")]
    assert table([{"group": "Female", "roc_auc": 0.6}]).height == 1
    assert table("nothing tabular") is None


def test_history_newest_first_without_ids_outcome_where_known():
    predictions = pl.DataFrame({
        "request_id": ["a", "b", "c"], "predicted_at": [1, 2, 3], "endpoint": ["predict"] * 3,
        "model_version": ["1", "2", "2"], "probability": [0.1, 0.2, 0.3], "risk_band": ["low", "medium", "high"],
        "decision": [False, False, True], "age": ["[70-80)"] * 3, "gender": ["Male"] * 3, "diag_1": ["428"] * 3,
        "time_in_hospital": [3] * 3,
    })  # fmt: skip
    outcomes = pl.DataFrame({"request_id": ["b"], "readmitted_30d": [False]})
    rows = recent_predictions(predictions, outcomes, limit=2)
    assert "request_id" not in rows.columns
    assert rows["outcome"].to_list() == [AWAITED, "not readmitted within 30 days"]
    assert filtered(rows, ["2"], ["high"])["probability"].to_list() == [0.3]


@pytest.fixture(params=["sqlite-duckdb", pytest.param("postgresql", marks=pytest.mark.postgres)])
def log_and_warehouse(request, tmp_path) -> tuple[str, str]:
    """The prediction log's and the warehouse's URLs: the default files, or both in a PostgreSQL schema."""
    if request.param == "sqlite-duckdb":
        return f"sqlite:///{tmp_path / 'predictions.sqlite'}", f"duckdb:///{tmp_path / 'warehouse.duckdb'}"
    url = request.getfixturevalue("pg_schema_url")
    return url, url


def test_history_reads_only_the_newest_predictions_and_their_outcomes(log_and_warehouse, monkeypatch):
    from datetime import UTC, datetime

    from readmission_platform.lib.outcomes import OUTCOME_SCHEMA, OUTCOMES
    from readmission_platform.lib.predictions import read_predictions
    from readmission_platform.lib.warehouse import open_warehouse
    from readmission_platform.serving.model import SMOKE_ENCOUNTERS
    from readmission_platform.serving.prediction_log import write_predictions

    log_url, warehouse_url = log_and_warehouse
    logged, shown = 3_000, 50
    encounter = {name: SMOKE_ENCOUNTERS[0].get(name) for name in FIELDS}
    assert write_predictions(log_url, (
        {"request_id": f"r{i}", "endpoint": "predict", "model_name": "m", "model_version": str(1 + i % 2),
         "probability": i / logged, "decision": False, "risk_band": "low", "inputs": encounter}
        for i in range(logged)
    )) == logged  # fmt: skip
    at = datetime(2026, 12, 1, tzinfo=UTC)
    known = pl.DataFrame(  # the outcomes of every other request, the oldest ones among them
        [{"batch_id": "outcomes_0001", "request_id": f"r{i}", "readmitted_30d": i % 4 == 0, "known_at": at,
          "source_file": "outcomes_0001.csv", "line_number": i + 2, "ingested_at": at} for i in range(0, logged, 2)],
        schema=OUTCOME_SCHEMA,
    )  # fmt: skip
    open_warehouse(warehouse_url).append(OUTCOMES, OUTCOME_SCHEMA, known)
    columns = ["request_id", *(c for c in SHOWN if c != "outcome")]
    whole = recent_predictions(read_predictions(log_url, columns), known.select("request_id", "readmitted_30d"), shown)

    handed_over: list[int] = []
    from_arrow = pl.from_arrow

    def counted(data, *args, **kwargs):
        frame = from_arrow(data, *args, **kwargs)
        handed_over.append(frame.height)
        return frame

    monkeypatch.setattr(pl, "from_arrow", counted)
    rows = read_recent(log_url, warehouse_url, shown)

    assert rows.equals(whole)  # what the page shows, as from reading everything
    assert rows["probability"].to_list() == [i / logged for i in range(logged - 1, logged - 1 - shown, -1)]
    assert rows["outcome"].to_list()[:3] == [AWAITED, "not readmitted within 30 days", AWAITED]
    assert handed_over and max(handed_over) <= shown  # neither the whole log nor every outcome was read


def test_a_service_that_takes_the_connection_and_never_answers_is_called_slow_not_down():
    import socket

    from readmission_platform.app.client import ServiceClient, ServiceError

    with socket.socket() as listening:
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        client = ServiceClient(f"http://127.0.0.1:{listening.getsockname()[1]}", timeout=0.5)
        with pytest.raises(ServiceError, match=r"did not answer /model within 0.5 s: it runs, but is slow or busy"):
            client.model()
