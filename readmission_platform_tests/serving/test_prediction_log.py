import json
import time

import pytest

from readmission_platform.serving.prediction_log import PredictionLog, count_predictions, read_predictions


def row(i: int) -> dict:
    return {
        "request_id": f"r{i}", "endpoint": "predict", "model_name": "m", "model_version": "3",
        "probability": i / 1000, "decision": i % 2 == 0, "risk_band": "low", "inputs": {"age": "[70-80)", "n": i},
    }  # fmt: skip


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def url(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'log' / 'predictions.sqlite'}"
    return request.getfixturevalue("pg_schema_url")


def test_every_row_is_written_and_a_clean_close_loses_nothing(url):
    log = PredictionLog(url, flush_seconds=0.05, batch_rows=100)
    for start in range(0, 1_000, 50):
        assert log.record([row(i) for i in range(start, start + 50)]) == 0
    log.close()
    stored = read_predictions(url)
    assert [r["request_id"] for r in stored] == [f"r{i}" for i in range(1_000)]
    assert stored[7]["inputs"] == {"age": "[70-80)", "n": 7} and stored[7]["decision"] is False
    assert log.written == 1_000 and log.dropped == 0 and count_predictions(url) == 1_000


def test_a_full_queue_drops_rows_and_counts_them_without_waiting(tmp_path):
    drops = []
    log = PredictionLog(f"sqlite:///{tmp_path / 'p.sqlite'}", capacity=10, flush_seconds=5, on_drop=drops.append)
    started = time.perf_counter()
    dropped = log.record([row(i) for i in range(500)])
    assert time.perf_counter() - started < 0.5
    assert dropped >= 480 and log.dropped == dropped == sum(drops)
    log.close()
    assert len(read_predictions(log.url)) == 500 - dropped


def test_rows_recorded_after_close_are_counted_as_dropped(tmp_path):
    log = PredictionLog(f"sqlite:///{tmp_path / 'p.sqlite'}")
    log.close()
    assert log.record([row(1)]) == 1 and log.dropped == 1


def test_an_unsupported_url_is_named():
    with pytest.raises(ValueError, match="neither sqlite"):
        PredictionLog("mysql://somewhere/db")


def test_a_frame_of_rows_is_written_whole_and_counts_against_the_capacity(tmp_path):
    import polars as pl

    frame = pl.DataFrame([row(i) for i in range(300)]).with_columns(
        pl.col("inputs").map_elements(lambda d: json.dumps(d), return_dtype=pl.String)
    )
    log = PredictionLog(f"sqlite:///{tmp_path / 'p.sqlite'}", capacity=500, flush_seconds=5)
    assert log.record_frame(pl.concat([frame, frame])) == 600  # more rows than the capacity: dropped whole
    assert log.record_frame(frame) == 0
    log.close()
    stored = read_predictions(log.url)
    assert [r["request_id"] for r in stored] == [f"r{i}" for i in range(300)]
    assert stored[3]["inputs"] == {"age": "[70-80)", "n": 3} and log.dropped == 600


def test_a_log_database_that_is_down_costs_the_rows_not_the_caller(free_port_url="postgresql://nobody@127.0.0.1:9/none"):
    drops = []
    log = PredictionLog(free_port_url, flush_seconds=0.05, on_drop=drops.append)  # nothing listens on port 9
    started = time.perf_counter()
    assert log.record([row(i) for i in range(10)]) == 0
    assert time.perf_counter() - started < 0.1
    log.close()
    assert log.dropped == 10 == sum(drops) and log.failed == 10 and log.written == 0


def test_single_rows_and_frames_keep_the_order_they_were_recorded_in(url):
    import polars as pl

    frame = pl.DataFrame([row(i) for i in range(100, 103)]).with_columns(
        pl.col("inputs").map_elements(lambda d: json.dumps(d), return_dtype=pl.String)
    )
    log = PredictionLog(url, flush_seconds=5)
    log.record([row(1), row(2)])
    log.record_frame(frame)
    log.record([row(3)])
    log.close()  # everything is written at once, in one batch
    stored = read_predictions(url)
    assert [r["request_id"] for r in stored] == ["r1", "r2", "r100", "r101", "r102", "r3"]
    assert [r["decision"] for r in stored] == [False, True, True, False, True, False]
    assert stored[3]["inputs"] == {"age": "[70-80)", "n": 101} and stored[3]["probability"] == 0.101
    assert {r["predicted_at"].tzinfo is None or r["predicted_at"].utcoffset().total_seconds() == 0 for r in stored} == {True}


def test_rows_a_sqlite_table_refuses_are_counted_and_the_writer_goes_on(tmp_path):
    import sqlite3

    path = tmp_path / "p.sqlite"
    with sqlite3.connect(path) as connection:  # a table of that name, of another shape
        connection.execute("CREATE TABLE predictions (id INTEGER PRIMARY KEY, request_id TEXT NOT NULL)")
    log = PredictionLog(f"sqlite:///{path}", flush_seconds=0.05)
    assert log.record([row(i) for i in range(4)]) == 0
    deadline = time.perf_counter() + 10
    while log.failed < 4 and time.perf_counter() < deadline:
        time.sleep(0.05)
    assert log.failed == 4 and log.dropped == 4 and log.written == 0
    assert log.record([row(9)]) == 0  # still taking rows
    log.close()
    assert log.failed == 5
    with sqlite3.connect(path) as connection:
        assert connection.execute("SELECT count(*) FROM predictions").fetchone() == (0,)
