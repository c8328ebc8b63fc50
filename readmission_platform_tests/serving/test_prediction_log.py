import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time

import polars as pl
import pytest
import sqlalchemy as sa

from readmission_platform.lib.encounter import FIELDS, typed_frame
from readmission_platform.lib.predictions import read_predictions
from readmission_platform.lib.warehouse import quote
from readmission_platform.serving.model import SMOKE_ENCOUNTERS
from readmission_platform.serving.prediction_log import (
    _CREATE_STAGED,
    _STAGED,
    PredictionLog,
    count_predictions,
    engine_for,
    write_predictions,
)


def inputs(i: int) -> dict:
    """A real encounter, as the service records it (every field, None where unknown), told apart by its lab count."""
    encounter = SMOKE_ENCOUNTERS[i % len(SMOKE_ENCOUNTERS)]
    return {name: encounter.get(name) for name in FIELDS} | {"num_lab_procedures": i % 300}


def row(i: int) -> dict:
    return {
        "request_id": f"r{i}", "endpoint": "predict", "model_name": "m", "model_version": "3",
        "probability": i / 1000, "decision": i % 2 == 0, "risk_band": "low", "inputs": inputs(i),
    }  # fmt: skip


def stored_rows(url: str) -> list[dict]:
    """The log's rows as the reader gives them, oldest first, each with `inputs`: the encounter's fields."""
    return [r | {"inputs": {name: r[name] for name in FIELDS}} for r in read_predictions(url).iter_rows(named=True)]


def frame_of(rows: list[dict]) -> pl.DataFrame:
    """Rows as `record_frame` takes them from the service: the fields as columns, typed as the request decodes them."""
    results = pl.DataFrame([{k: v for k, v in r.items() if k != "inputs"} for r in rows])
    return pl.concat([results, typed_frame([r["inputs"] for r in rows])], how="horizontal")


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
    stored = stored_rows(url)
    assert [r["request_id"] for r in stored] == [f"r{i}" for i in range(1_000)]
    assert stored[7]["inputs"] == inputs(7) and stored[7]["decision"] is False
    assert log.written == 1_000 and log.dropped == 0 and count_predictions(url) == 1_000


def test_single_rows_coming_one_by_one_are_gathered_into_few_writes(url):
    log = PredictionLog(url, gather_seconds=0.05)
    started = time.monotonic()
    for i in range(300):  # a request a millisecond, as under load
        assert log.record([row(i)]) == 0
        time.sleep(0.001)
    elapsed = time.monotonic() - started
    log.close()
    assert log.written == 300 and count_predictions(url) == 300
    # At most one write per gathering window, besides the first row's (written at once) and the close's.
    assert log.writes <= elapsed / 0.05 + 2, f"{log.writes} writes in {elapsed:.2f} s"


def test_a_full_queue_drops_rows_and_counts_them_without_waiting(tmp_path):
    url = f"sqlite:///{tmp_path / 'p.sqlite'}"
    engine_for(url).dispose()
    # The database is locked, so the writer cannot drain the queue (beyond what its pipe holds): a caller that waited
    # for room would return only once the writer had written or given up, and would find `written` or `failed` counted.
    lock = sqlite3.connect(tmp_path / "p.sqlite", isolation_level=None)
    lock.execute("BEGIN IMMEDIATE")
    drops = []
    log = PredictionLog(url, capacity=10, flush_seconds=5, on_drop=drops.append)
    dropped = sum(log.record([row(i)]) for i in range(5_000))
    assert log.written == log.failed == 0
    assert dropped >= 4_500 and log.dropped == dropped == sum(drops)
    lock.execute("ROLLBACK")
    lock.close()
    log.close()
    assert read_predictions(log.url).height == 5_000 - dropped


def test_rows_recorded_after_close_are_counted_as_dropped(tmp_path):
    log = PredictionLog(f"sqlite:///{tmp_path / 'p.sqlite'}")
    log.close()
    assert log.record([row(1)]) == 1 and log.dropped == 1


def finished(log: PredictionLog, timeout: float = 60) -> None:
    """Wait until the log's sender has handed everything over and its writer process has ended."""
    log._sender.join(timeout)
    for reader in log._readers:
        reader.join(timeout)


def test_rows_still_queued_when_a_close_runs_out_of_time_are_counted_and_those_handed_over_land(tmp_path):
    path = tmp_path / "p.sqlite"
    engine_for(f"sqlite:///{path}").dispose()
    blocker = sqlite3.connect(path, isolation_level=None)
    blocker.execute("BEGIN EXCLUSIVE")  # the writer's first write waits on the lock (its busy timeout is 30 s)
    counted = []
    log = PredictionLog(f"sqlite:///{path}", flush_seconds=0.05, batch_rows=10, on_drop=counted.append)
    assert log.record([row(i) for i in range(3_000)]) == 0
    time.sleep(0.5)  # the writer has taken a first batch and waits; the pipe to it fills, and the rest stay queued

    started = time.monotonic()
    log.close(timeout=1)

    assert time.monotonic() - started < 5
    assert log.dropped > 2_000 and counted == [log.dropped] and log.written == 0
    blocker.execute("ROLLBACK")
    blocker.close()
    finished(log)  # what the writer was handed lands once the lock is free, and is counted
    assert log.written + log.dropped == 3_000 and log.failed == 0, (log.written, log.dropped)
    assert count_predictions(log.url) == log.written > 0


def test_a_worker_killed_outright_still_gets_what_it_handed_its_writer_written(tmp_path):
    path = tmp_path / "p.sqlite"
    url = f"sqlite:///{path}"
    engine_for(url).dispose()
    lock = sqlite3.connect(path, isolation_level=None)
    lock.execute("BEGIN EXCLUSIVE")  # nothing is written before the worker dies: its writer holds ten batches then
    child = f"""
import os, signal, sys, time
sys.path.insert(0, {os.path.dirname(__file__)!r})
from test_prediction_log import row
from readmission_platform.serving.prediction_log import PredictionLog
log = PredictionLog({url!r}, flush_seconds=0.05, gather_seconds=0, batch_rows=3)
log.record([row(i) for i in range(30)])
deadline = time.monotonic() + 30
while (log._child is None or log._child.sent < 30) and time.monotonic() < deadline:  # handed over, not written
    time.sleep(0.001)
print(log._child.process.pid, log._child.sent, log.written, flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""
    # Its errors to a file: the writer, which outlives it, holds them open.
    with open(tmp_path / "stderr", "w") as errors:
        done = subprocess.run([sys.executable, "-c", child], stdout=subprocess.PIPE, stderr=errors, text=True, timeout=120)
    assert done.returncode == -signal.SIGKILL, done.stdout + (tmp_path / "stderr").read_text()
    writer, sent, written = map(int, done.stdout.split())
    assert (sent, written) == (30, 0)
    lock.execute("ROLLBACK")
    lock.close()
    deadline = time.monotonic() + 30
    while os.path.exists(f"/proc/{writer}") and time.monotonic() < deadline:  # the writer ends once it has written
        time.sleep(0.05)
    assert not os.path.exists(f"/proc/{writer}")
    assert [r["request_id"] for r in stored_rows(url)] == [f"r{i}" for i in range(30)]


def test_a_writer_process_that_dies_is_replaced_and_the_rows_it_held_are_counted(tmp_path):
    path = tmp_path / "p.sqlite"
    engine_for(f"sqlite:///{path}").dispose()
    lock = sqlite3.connect(path, isolation_level=None)
    lock.execute("BEGIN EXCLUSIVE")  # the writer holds what it is handed
    drops = []
    log = PredictionLog(f"sqlite:///{path}", flush_seconds=0.05, on_drop=drops.append)
    assert log.record([row(i) for i in range(3)]) == 0
    deadline = time.monotonic() + 30
    while (log._child is None or log._child.sent < 3) and time.monotonic() < deadline:
        time.sleep(0.01)
    first = log._child
    first.process.kill()
    while not first.ended and time.monotonic() < deadline:
        time.sleep(0.01)
    assert (log.dropped, log.failed, drops) == (3, 3, [3])  # handed over, never written: counted
    lock.execute("ROLLBACK")
    lock.close()
    assert log.record([row(i) for i in range(3, 5)]) == 0
    log.close()
    assert log._child is not first and (log.written, log.dropped) == (2, 3)
    assert [r["request_id"] for r in stored_rows(log.url)] == ["r3", "r4"]


def test_write_predictions_writes_rows_then_a_frame_now_and_raises_what_kept_them_out(url):
    assert write_predictions(url, [row(1), row(2)], frame_of([row(3)])) == 3
    stored = stored_rows(url)
    assert [r["request_id"] for r in stored] == ["r1", "r2", "r3"] and stored[2]["inputs"] == inputs(3)
    with pytest.raises(RuntimeError, match=r"1 rows not written: 3 failed writes to postgresql://\*\*\*@127.0.0.1:9/none"):
        write_predictions("postgresql://nobody@127.0.0.1:9/none", [row(4)])


def test_an_unsupported_url_is_named():
    with pytest.raises(ValueError, match="neither sqlite"):
        PredictionLog("mysql://somewhere/db")


def test_a_frame_of_rows_is_written_whole_and_counts_against_the_capacity(tmp_path):
    frame = frame_of([row(i) for i in range(300)])
    log = PredictionLog(f"sqlite:///{tmp_path / 'p.sqlite'}", capacity=500, flush_seconds=5)
    assert log.record_frame(pl.concat([frame, frame])) == 600  # more rows than the capacity: dropped whole
    assert log.record_frame(frame) == 0
    log.close()
    stored = stored_rows(log.url)
    assert [r["request_id"] for r in stored] == [f"r{i}" for i in range(300)]
    assert stored[3]["inputs"] == inputs(3) and log.dropped == 600


def test_a_log_database_that_is_down_costs_the_rows_not_the_caller(free_port_url="postgresql://nobody@127.0.0.1:9/none"):
    drops = []
    # Each drop with the thread that counted it: the attempts to reach the database are the writer's, never the caller's.
    on_drop = lambda n: drops.append((n, threading.current_thread()))  # noqa: E731
    log = PredictionLog(free_port_url, flush_seconds=0.05, on_drop=on_drop)
    assert log.record([row(i) for i in range(10)]) == 0  # nothing listens on port 9
    log.close()
    assert log.dropped == 10 == sum(n for n, _ in drops) and log.failed == 10 and log.written == 0
    assert threading.current_thread() not in {thread for _, thread in drops}


def test_single_rows_and_frames_keep_the_order_they_were_recorded_in(url):
    frame = frame_of([row(i) for i in range(100, 103)])
    log = PredictionLog(url, flush_seconds=5)
    log.record([row(1), row(2)])
    log.record_frame(frame)
    log.record([row(3)])
    log.close()  # everything is written at once, in one batch
    stored = stored_rows(url)
    assert [r["request_id"] for r in stored] == ["r1", "r2", "r100", "r101", "r102", "r3"]
    assert [r["decision"] for r in stored] == [False, True, True, False, True, False]
    assert stored[3]["inputs"] == inputs(101) and stored[3]["probability"] == 0.101
    assert {r["predicted_at"].tzinfo is None or r["predicted_at"].utcoffset().total_seconds() == 0 for r in stored} == {True}


def test_rows_a_sqlite_table_refuses_are_counted_and_the_writer_goes_on(tmp_path):
    path = tmp_path / "p.sqlite"
    engine_for(f"sqlite:///{path}").dispose()
    with sqlite3.connect(path) as connection:  # the log's own table, refusing every row
        connection.execute("CREATE TRIGGER refuse BEFORE INSERT ON predictions BEGIN SELECT RAISE(ABORT, 'no'); END")
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


@pytest.mark.postgres
def test_rows_postgresql_refuses_are_counted_and_the_writer_goes_on(pg_schema_url):
    # A text PostgreSQL cannot store (its COPY raises psycopg's own error, not SQLAlchemy's), as a request validated
    # by other rules might carry.
    log = PredictionLog(pg_schema_url, flush_seconds=0.05)
    refused = row(0)
    refused["inputs"] = refused["inputs"] | {"medical_specialty": "Surg\x00ery"}
    assert log.record([refused]) == 0
    deadline = time.perf_counter() + 10
    while log.failed < 1 and time.perf_counter() < deadline:
        time.sleep(0.05)
    assert log.failed == 1 and log.dropped == 1
    assert log.record([row(i) for i in range(1, 4)]) == 0  # the writer is alive and writes the next rows
    log.close()
    assert [r["request_id"] for r in stored_rows(pg_schema_url)] == ["r1", "r2", "r3"]
    assert log.written == 3 and log.dropped == 1


def test_the_fields_are_typed_columns_named_as_the_data_set_names_them(url):
    log = PredictionLog(url, flush_seconds=0.05)
    log.record([row(1) | {"probability": 1 / 3}])
    log.record_frame(frame_of([row(2) | {"probability": 2 / 3}]))
    log.close()
    assert read_predictions(url)["probability"].to_list() == [1 / 3, 2 / 3]  # every digit kept
    engine = engine_for(url)
    with engine.connect() as connection:
        found = connection.execute(sa.text('SELECT "glyburide-metformin", "A1Cresult", num_lab_procedures, weight '
                                           "FROM predictions ORDER BY request_id")).all()  # fmt: skip
    engine.dispose()
    expected = [(inputs(i)["glyburide-metformin"], inputs(i)["A1Cresult"], i, inputs(i)["weight"]) for i in (1, 2)]
    assert [tuple(r) for r in found] == expected and isinstance(found[0][2], int)


OLD_LAYOUT = (
    "CREATE TABLE predictions (id {id} PRIMARY KEY, request_id VARCHAR(128) NOT NULL, predicted_at {time} NOT NULL, "
    "endpoint VARCHAR(32) NOT NULL, model_name VARCHAR(128) NOT NULL, model_version VARCHAR(32) NOT NULL, "
    "probability FLOAT NOT NULL, decision BOOLEAN NOT NULL, risk_band VARCHAR(16) NOT NULL, inputs TEXT NOT NULL)"
)


def test_a_table_of_an_earlier_layout_is_kept_under_another_name_and_a_new_one_is_made(url):
    engine = engine_for(url, create=False)
    postgres = engine.dialect.name == "postgresql"
    with engine.begin() as connection:  # as the version that logged the fields as one JSON text made it
        layout = {"id": "BIGSERIAL", "time": "TIMESTAMP WITH TIME ZONE"} if postgres else {"id": "INTEGER", "time": "DATETIME"}
        connection.execute(sa.text(OLD_LAYOUT.format(**layout)))
        if postgres:
            connection.execute(sa.text("CREATE INDEX predictions_model_version ON predictions (model_version)"))
        connection.execute(sa.text(
            "INSERT INTO predictions (request_id, predicted_at, endpoint, model_name, model_version, probability, "
            "decision, risk_band, inputs) VALUES ('old-1', '2026-01-01 00:00:00', 'predict', 'm', '1', 0.5, true, "
            "'high', '{\"age\": \"[70-80)\"}')"
        ))  # fmt: skip
    log = PredictionLog(url, flush_seconds=0.05)
    log.record([row(1)])
    log.close()
    assert log.written == 1 and read_predictions(url)["request_id"].to_list() == ["r1"]
    tables = sa.inspect(engine).get_table_names()
    (kept,) = [name for name in tables if name.startswith("predictions_until_")]
    with engine.connect() as connection:
        assert connection.execute(sa.text(f'SELECT request_id, inputs FROM "{kept}"')).all() == [("old-1", '{"age": "[70-80)"}')]
    engine.dispose()


def test_a_staged_batch_is_copied_into_the_sqlite_table_as_stored(tmp_path):
    # The write lock covers only this copy: it must stay SQLite's transfer of whole records (OP_RowData), which any
    # difference between the two tables' columns would turn into a row-by-row insert.
    path = tmp_path / "p.sqlite"
    engine_for(f"sqlite:///{path}").dispose()
    with sqlite3.connect(path) as connection:
        connection.execute(_CREATE_STAGED)
        plan = [step[1] for step in connection.execute(f"EXPLAIN INSERT INTO main.predictions SELECT * FROM temp.{_STAGED}")]
    assert "RowData" in plan and "Column" not in plan


@pytest.mark.skipif(sys.platform != "linux" or os.geteuid() != 0, reason="a thread's own niceness below 0: Linux, as root")
def test_the_writer_process_runs_at_the_niceness_it_is_given(tmp_path):
    log = PredictionLog(f"sqlite:///{tmp_path / 'p.sqlite'}", nice=-5, flush_seconds=0.05)
    default = PredictionLog(f"sqlite:///{tmp_path / 'q.sqlite'}", flush_seconds=0.05)
    for each in (log, default):  # a row written: the writer has set its niceness by then
        each.record([row(1)])
        deadline = time.perf_counter() + 30
        while each.written < 1 and time.perf_counter() < deadline:
            time.sleep(0.01)
    assert os.getpriority(os.PRIO_PROCESS, log._child.process.pid) == -5
    assert os.getpriority(os.PRIO_PROCESS, default._child.process.pid) == os.getpriority(os.PRIO_PROCESS, 0)
    log.close()
    default.close()


@pytest.mark.skipif(
    sys.platform != "linux" or os.geteuid() != 0 or shutil.which("setpriv") is None,
    reason="a child process of root's without CAP_SYS_NICE, by util-linux's setpriv",
)
def test_a_writer_not_permitted_its_niceness_says_so_and_still_writes_every_row(tmp_path):
    child = f"""
import logging, os, sys
try:
    os.setpriority(os.PRIO_PROCESS, 0, -1)
    sys.exit("this process may still lower a niceness")
except PermissionError:
    pass
logging.basicConfig(level=logging.INFO, stream=sys.stdout)
sys.path.insert(0, {os.path.dirname(__file__)!r})
from test_prediction_log import row
from readmission_platform.serving.prediction_log import PredictionLog, count_predictions
log = PredictionLog("sqlite:///{tmp_path}/p.sqlite", nice=-5, flush_seconds=0.05)
log.record([row(i) for i in range(20)])
log.close()
print("written", log.written, "logged", count_predictions(log.url))
"""
    without_nice = ["setpriv", "--bounding-set", "-sys_nice", "--inh-caps", "-sys_nice"]
    done = subprocess.run([*without_nice, sys.executable, "-c", child], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "the writer keeps its priority (niceness -5 not permitted" in done.stdout
    assert "written 20 logged 20" in done.stdout


def test_a_log_from_before_rollouts_gets_their_columns_and_keeps_its_rows(url):
    from readmission_platform.serving.prediction_log import ADDED_COLUMNS, ROLLOUT_COLUMNS, TABLE, _columns

    engine = engine_for(url, create=False)
    postgres = engine.dialect.name == "postgresql"
    before = [c for c in _columns() if c.name not in ADDED_COLUMNS]
    ids = [sa.Column("id", sa.BigInteger(), primary_key=True, autoincrement=True)] if postgres else []
    sa.Table(TABLE, sa.MetaData(), *ids, *before).create(engine)
    with engine.begin() as connection:
        old = row(0) | inputs(0) | {"predicted_at": "2026-11-30 10:00:00"}
        connection.execute(sa.text(f"INSERT INTO {TABLE} ({', '.join(quote(k) for k in old if k != 'inputs')}) "
                                   f"VALUES ({', '.join(':p' + str(i) for i, k in enumerate(old) if k != 'inputs')})"),
                           {f"p{i}": v for i, (k, v) in enumerate(old.items()) if k != "inputs"})  # fmt: skip
    engine.dispose()
    # Readers see the new columns before any worker has added them: NULL, the stage production's.
    read = read_predictions(url, ["request_id", *ROLLOUT_COLUMNS])
    assert read.to_dicts() == [{"request_id": "r0", "stage": "production", "shadow_version": None,
                                "shadow_probability": None, "candidate_error": None, "candidate_ms": None}]  # fmt: skip
    log = PredictionLog(url)
    log.record([row(1) | {"stage": "canary", "candidate_ms": 1.5, "patient_key": "a" * 64}])
    shadowed = frame_of([row(2), row(3)]).with_columns(
        stage=pl.lit("production"), shadow_version=pl.lit("4"), shadow_probability=pl.Series([0.2, 0.3]),
        candidate_error=pl.lit(None, dtype=pl.String), candidate_ms=pl.lit(2.0),
    )  # fmt: skip
    log.record_frame(shadowed)
    log.close()
    assert log.written == 3 and log.dropped == 0
    engine = engine_for(url, create=False)
    assert [c["name"] for c in sa.inspect(engine).get_columns(TABLE)][-6:] == list(ADDED_COLUMNS)
    read = read_predictions(url, ["request_id", *ADDED_COLUMNS])
    assert read.rows() == [
        ("r0", "production", None, None, None, None, None),
        ("r1", "canary", None, None, None, 1.5, "a" * 64),
        ("r2", "production", "4", 0.2, None, 2.0, None),
        ("r3", "production", "4", 0.3, None, 2.0, None),
    ]
    assert [r["request_id"] for r in stored_rows(url)] == ["r0", "r1", "r2", "r3"]
    assert sa.inspect(engine).get_table_names() == [TABLE]  # migrated in place, not renamed away
    engine.dispose()
