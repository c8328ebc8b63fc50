"""The prediction log's reader on both backends, reading what the service's writer wrote."""

import sqlite3
import time
from datetime import UTC, datetime, timedelta

import dagster as dg
import polars as pl
import pytest

from readmission_platform.defs.resources import PredictionLogResource
from readmission_platform.lib.encounter import FIELDS
from readmission_platform.lib import predictions
from readmission_platform.lib.predictions import TYPES, PredictionLogError, read_predictions
from readmission_platform.lib.reporting import masked
from readmission_platform.serving.model import SMOKE_ENCOUNTERS
from readmission_platform.serving.prediction_log import write_predictions


def row(i: int) -> dict:
    encounter = SMOKE_ENCOUNTERS[i % len(SMOKE_ENCOUNTERS)]
    return {
        "request_id": f"r{i}", "endpoint": "predict", "model_name": "m", "model_version": str(1 + i % 2),
        "probability": i / 100, "decision": i % 3 == 0, "risk_band": "low",
        "inputs": {name: encounter.get(name) for name in FIELDS},
    }  # fmt: skip


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def url(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'predictions.sqlite'}"
    return request.getfixturevalue("pg_schema_url")


def write(url: str, rows: list[dict]) -> None:
    assert write_predictions(url, rows) == len(rows)


def test_every_row_reads_back_typed_oldest_first(url):
    write(url, [row(i) for i in range(40)])
    frame = read_predictions(url)
    assert frame.schema == pl.Schema(TYPES)
    assert frame["request_id"].to_list() == [f"r{i}" for i in range(40)]
    assert frame["probability"].to_list() == [i / 100 for i in range(40)]
    assert frame["decision"].to_list() == [i % 3 == 0 for i in range(40)]
    assert frame["model_version"].to_list() == [str(1 + i % 2) for i in range(40)]
    expected = SMOKE_ENCOUNTERS[3 % len(SMOKE_ENCOUNTERS)]
    assert {name: frame[name][3] for name in FIELDS} == {name: expected.get(name) for name in FIELDS}
    seconds = (datetime.now(UTC) - frame["predicted_at"][0]).total_seconds()
    assert 0 <= seconds < 120


def test_a_time_window_and_columns_select_what_is_read(url):
    write(url, [row(i) for i in range(5)])
    time.sleep(0.05)
    middle = datetime.now(UTC)
    time.sleep(0.05)
    write(url, [row(i) for i in range(5, 8)])
    later = read_predictions(url, ["request_id", "probability"], since=middle)
    assert later.columns == ["request_id", "probability"]
    assert later["request_id"].to_list() == ["r5", "r6", "r7"]
    earlier = read_predictions(url, ["request_id"], until=middle)
    assert earlier["request_id"].to_list() == [f"r{i}" for i in range(5)]
    assert read_predictions(url, ["request_id"], since=middle, until=middle + timedelta(hours=-1)).is_empty()


def test_a_log_not_written_yet_reads_as_no_rows(url):
    frame = read_predictions(url, ["request_id", "predicted_at"])
    assert frame.is_empty() and frame.schema == pl.Schema({"request_id": pl.String, "predicted_at": TYPES["predicted_at"]})


def test_a_wrong_column_url_or_naive_time_is_named(tmp_path):
    url = f"sqlite:///{tmp_path / 'p.sqlite'}"
    with pytest.raises(PredictionLogError, match=r"no column \['patient_nbr'\]"):
        read_predictions(url, ["request_id", "patient_nbr"])
    with pytest.raises(PredictionLogError, match="neither sqlite:///path nor postgresql://"):
        read_predictions("mysql://somewhere/db")
    with pytest.raises(PredictionLogError, match="has no time zone"):
        read_predictions(url, since=datetime(2026, 1, 1))


def test_a_log_that_does_not_answer_or_is_no_database_is_named(tmp_path):
    garbage = tmp_path / "p.sqlite"
    garbage.write_text("not a database\n" * 100)
    for url, reason in ((f"sqlite:///{garbage}", "file is not a database"), ("postgresql://someone:secret@127.0.0.1:1/db", "Failed to connect")):
        for read in (lambda: read_predictions(url, ["request_id"]), lambda: predictions.newest_predictions(url, ["request_id"])):
            with pytest.raises(PredictionLogError) as raised:
                read()
            assert str(raised.value).startswith(f"the prediction log at {masked(url)} cannot be read: ")
            assert reason in str(raised.value) and "secret" not in str(raised.value)


def test_the_resource_reads_the_log_inside_an_asset(tmp_path):
    url = f"sqlite:///{tmp_path / 'predictions.sqlite'}"
    write(url, [row(i) for i in range(3)])

    @dg.asset
    def logged(prediction_log: PredictionLogResource) -> dg.MaterializeResult:
        return dg.MaterializeResult(metadata={"rows": prediction_log.read(["request_id"]).height})

    with dg.instance_for_test() as instance:
        result = dg.materialize([logged], resources={"prediction_log": PredictionLogResource(url=url)}, instance=instance)
    assert result.asset_materializations_for_node("logged")[0].metadata["rows"].value == 3


def test_a_column_the_stored_table_lacks_reads_as_nulls(tmp_path):
    url = f"sqlite:///{tmp_path / 'predictions.sqlite'}"
    write(url, [row(i) for i in range(3)])
    with sqlite3.connect(tmp_path / "predictions.sqlite") as connection:  # a log made before the column existed
        connection.execute("ALTER TABLE predictions DROP COLUMN risk_band")
    frame = read_predictions(url, ["request_id", "risk_band"])
    assert frame.schema == pl.Schema({"request_id": pl.String, "risk_band": TYPES["risk_band"]})
    assert frame["request_id"].to_list() == ["r0", "r1", "r2"] and frame["risk_band"].null_count() == 3


def test_a_sqlite_log_read_in_parts_on_threads_reads_every_row_once_in_order(tmp_path, monkeypatch):
    url = f"sqlite:///{tmp_path / 'predictions.sqlite'}"
    write(url, [row(i) for i in range(41)])
    whole = read_predictions(url)
    monkeypatch.setattr(predictions, "_ROWS_PER_THREAD", 10)  # 41 rows: as many parts as there are cores, up to 4
    parts = read_predictions(url)
    assert parts.equals(whole) and parts["request_id"].to_list() == [f"r{i}" for i in range(41)]
    assert read_predictions(url, ["request_id"], since=whole["predicted_at"][0])["request_id"].to_list() == whole["request_id"].to_list()


def test_a_sqlite_column_null_in_its_first_thousands_of_rows_reads_with_its_type(tmp_path):
    from readmission_platform.lib.predictions import read_predictions as read_frame
    from readmission_platform.serving.model import SMOKE_ENCOUNTERS
    from readmission_platform.serving.prediction_log import write_predictions

    url = f"sqlite:///{tmp_path / 'predictions.sqlite'}"
    base = {"endpoint": "predict", "model_name": "m", "model_version": "1", "probability": 0.1, "decision": False,
            "risk_band": "low", "stage": "production", "inputs": dict(SMOKE_ENCOUNTERS[0])}  # fmt: skip
    write_predictions(url, [base | {"request_id": f"r{i}"} for i in range(3_000)]
                      + [base | {"request_id": "late", "shadow_version": "2", "shadow_probability": 0.4,
                                 "candidate_error": "raised ValueError: x", "candidate_ms": 1.5}])  # fmt: skip
    read = read_frame(url, ["request_id", "shadow_version", "shadow_probability", "candidate_error", "candidate_ms"])
    assert read.height == 3_001 and read.row(-1) == ("late", "2", 0.4, "raised ValueError: x", 1.5)
    assert read["candidate_error"].null_count() == 3_000


def test_the_predictions_of_given_requests_are_picked_out_in_order(url):
    write(url, [row(i) for i in range(30)] + [row(4) | {"probability": 0.99}])  # r4 answered twice
    picked = read_predictions(url, ["request_id", "probability"], request_ids=["r12", "r4", "r4", "r29", "never"])
    assert picked.rows() == [("r4", 0.04), ("r12", 0.12), ("r29", 0.29), ("r4", 0.99)]
    assert read_predictions(url, ["request_id"], request_ids=[]).is_empty()
    first = read_predictions(url, ["predicted_at"])["predicted_at"][0]
    assert read_predictions(url, ["request_id"], since=first, request_ids=["r1", "r30"])["request_id"].to_list() == ["r1"]


def test_the_newest_prediction_is_the_last_written(url):
    assert predictions.newest_predictions(url, ["model_version"]).is_empty()
    write(url, [row(i) for i in range(5)])
    write(url, [row(6)])
    newest = predictions.newest_predictions(url, ["request_id", "model_version", "stage"])
    assert newest.rows() == [("r6", "1", "production")] and newest.schema == pl.Schema({k: TYPES[k] for k in newest.columns})
    with pytest.raises(PredictionLogError, match=r"no column \['patient_nbr'\]"):
        predictions.newest_predictions(url, ["patient_nbr"])


def test_many_requests_are_picked_out_of_a_sqlite_log_read_whole_as_a_few_are_in_the_database(tmp_path):
    url = f"sqlite:///{tmp_path / 'predictions.sqlite'}"
    write(url, [row(i) for i in range(40)] + [row(4) | {"probability": 0.99}])
    few, many = ["r4", "r7", "none"], [f"r{i}" for i in range(0, 40, 2)]  # 3 and 20 of 41 rows
    for ids in (few, many):
        whole = read_predictions(url, ["probability", "decision"], request_ids=ids)
        expected = read_predictions(url).filter(pl.col("request_id").is_in(ids)).select("probability", "decision")
        assert whole.equals(expected) and whole.height == len([i for i in ids if i != "none"]) + 1
