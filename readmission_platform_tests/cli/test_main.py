"""The `readmission` command as a person runs it: landing batches and the headless demo."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from readmission_platform.serving.server import free_port

DEMO_ROWS = 15_500  # two batches: 15,000 + 500


def readmission(
    *args: str, home: Path, source: Path | None = None, timeout: float = 180, umask: int = 0o022, extra: dict | None = None
) -> subprocess.CompletedProcess:
    """The command in a child process with the given umask (the usual one by default), on a clean environment.

    `timeout` guards against a hang, not a slow start: on two loaded cores `status` once took over 60 s. Past it the
    command is interrupted as Ctrl-C would, so that the demo stops the daemon and the `bentoml serve` it
    started (a SIGKILL left them running on the test's home), then killed; the test fails with what it printed.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith(("READMISSION_", "DAGSTER_"))}
    env["READMISSION_HOME"] = str(home)
    if source is not None:
        env["READMISSION_SOURCE"] = str(source)
    env |= extra or {}
    command = [str(Path(sys.executable).with_name("readmission")), *args]
    with subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, umask=umask) as process:
        try:
            out, err = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.send_signal(signal.SIGINT)
            try:
                out, err = process.communicate(timeout=120)
            except subprocess.TimeoutExpired:
                process.kill()
                out, err = process.communicate()
            pytest.fail(f"`readmission {' '.join(args)}` did not finish within {timeout:.0f} s; it printed:\n{out}\n{err}")
    return subprocess.CompletedProcess(command, process.returncode, out, err)


def reachable_by_others(home: Path) -> list[str]:
    """Every file or folder under `home` (itself included) that its user's group or other users may open."""
    return [
        f"{path.relative_to(home)} {oct(path.stat().st_mode & 0o777)}"
        for path in (home, *home.rglob("*"))
        if not path.is_symlink() and path.stat().st_mode & 0o077
    ]


@pytest.fixture(scope="module")
def demo_source(tmp_path_factory, full_source_bytes) -> Path:
    path = tmp_path_factory.mktemp("source") / "export.csv"
    path.write_bytes(b"".join(full_source_bytes.splitlines(keepends=True)[: DEMO_ROWS + 1]))
    return path


def test_land_drops_the_next_batches_then_the_rest(tmp_path, demo_source):
    first = readmission("land", "--count", "1", home=tmp_path, source=demo_source)
    rest = readmission("land", "--all", home=tmp_path, source=demo_source)
    nothing_left = readmission("land", "--count", "1", home=tmp_path, source=demo_source)

    assert first.returncode == 0, first.stderr
    assert "batch_0001.csv (15,000 encounters)" in first.stdout
    assert sorted(p.name for p in (tmp_path / "landing").iterdir()) == ["batch_0001.csv", "batch_0002.csv"]
    assert "batch_0002.csv (500 encounters)" in rest.stdout
    assert "already in" in nothing_left.stdout
    assert (tmp_path / "landing" / "batch_0001.csv").read_bytes().count(b"\r\n") == 15_001


def test_landed_files_are_private_whatever_the_umask(tmp_path, demo_source):
    home = tmp_path / "home"
    home.mkdir(mode=0o755)

    result = readmission("land", "--count", "1", home=home, source=demo_source, umask=0o000)

    assert result.returncode == 0, result.stderr
    assert (home / "landing" / "batch_0001.csv").stat().st_mode & 0o777 == 0o600
    assert reachable_by_others(home) == []


def test_land_refuses_a_source_of_another_schema_and_lands_nothing(tmp_path):
    source = tmp_path / "other.csv"
    source.write_text("id,name\n1,x\n")

    result = readmission("land", "--all", home=tmp_path, source=source)

    assert result.returncode == 2
    assert "missing ['encounter_id'" in result.stderr and "unexpected ['id', 'name']" in result.stderr
    assert not list((tmp_path / "landing").glob("*.csv"))


def test_land_takes_a_source_whose_lines_end_in_cr_alone(tmp_path, demo_source):
    source = tmp_path / "old-mac.csv"
    source.write_bytes(b"\r".join(demo_source.read_bytes().splitlines()[:11]) + b"\r")

    result = readmission("land", "--count", "1", home=tmp_path, source=source)

    assert result.returncode == 0, result.stderr
    assert "batch_0001.csv (10 encounters)" in result.stdout


def test_land_says_a_source_without_encounters_holds_none_and_lands_nothing(tmp_path, demo_source):
    source = tmp_path / "header-only.csv"
    source.write_bytes(demo_source.read_bytes().splitlines(keepends=True)[0])

    result = readmission("land", "--count", "1", home=tmp_path, source=source)

    assert result.returncode == 2
    assert result.stderr.strip() == f"readmission land: source {source} not landed: it holds a header but no encounters"
    assert "already in" not in result.stdout
    assert not list((tmp_path / "landing").glob("*.csv"))


def test_land_rejects_a_count_below_one(tmp_path):
    result = readmission("land", "--count", "0", home=tmp_path)
    assert result.returncode == 2 and "at least 1" in result.stderr


@pytest.fixture(scope="module")
def two_batches(tmp_path_factory, full_source_bytes) -> Path:
    """The data set's last two batches (15,000 and 11,766 encounters). The second version, trained on both, beats the
    first with 95 % confidence, and they are of two families (a logistic regression on the first batch, LightGBM on
    both) whose probabilities differ by a PSI above the rollout's fixed 0.25, on the test patients as on the demo's
    traffic: its rollout reaches production because the promotion's test comparison foresaw that difference
    (`lib/rollout.Foreseen`). Which
    versions a demo makes is fixed by its data (training and the comparison are seeded); on most pairs of batches the
    second is not better with that confidence and the platform rightly keeps the first (the first two among them;
    benchmarks/README.md, Training)."""
    lines = full_source_bytes.splitlines(keepends=True)
    path = tmp_path_factory.mktemp("source") / "export.csv"
    path.write_bytes(b"".join([lines[0], *lines[1 + 5 * 15_000 :]]))
    return path


@pytest.mark.e2e
def test_demo_serves_from_the_first_promotion_and_follows_the_next_without_a_restart(tmp_path, two_batches):
    # --timeout bounds each run the demo waits for (it then names the log to read); the whole demo waits for about ten
    # runs, so the whole gets more than one run's bound: on two loaded cores a single bound for all of it ran out.
    result = readmission("demo", "--port", str(free_port()), "--timeout", "900", home=tmp_path, source=two_batches, timeout=2400)

    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    for batch in ("batch_0001", "batch_0002"):
        assert f"landed {batch}.csv" in out
        assert f"ingest_batch {batch}" in out
    assert "retrain (after batch_0001, new_data)" in out  # progress
    # Every line of progress names its time, stage and batch; the service answered before the second batch landed.
    assert re.search(r"^\[ *\d+ s\] more batches +batch 2/2  landed batch_0002\.csv", out, re.MULTILINE), out
    first = re.search(r"^\[ *\d+ s\] first model +batch 1/2  first prediction: POST (http://127\.0\.0\.1:\d+)/predict .*\n"
                      r" +→ 200 (\{.*\})$", out, re.MULTILINE)  # fmt: skip
    assert first, out
    assert out.index(first.group(0)) < out.index("landed batch_0002.csv")
    answer = json.loads(first.group(2))
    assert 0 < answer["probability"] < 1 and answer["risk_band"] in ("low", "medium", "high")
    assert answer["request_id"] == "demo-1"
    changed = re.search(r"the service now answers with v(\d+) \(was v(\d+)\), without a restart: probability "
                        r"0\.\d{3} → 0\.\d{3}", out)  # fmt: skip
    assert changed and changed.group(2) == answer["model_version"] and int(changed.group(1)) > int(changed.group(2)), out
    summary = out[out.index("batch          status") :]
    assert "total                    26,766" in summary
    assert "FAILED" not in summary and " failed — " not in summary  # drift may warn: the file is in time order
    assert f"2 model versions registered; production: v{changed.group(1)}" in summary
    decisions = re.findall(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d  (promoted|not_promoted) ", summary, re.MULTILINE)
    assert decisions == ["promoted", "promoted"]  # a decision for each retrain, both promote: the change watched
    assert "first production model" in summary
    # The loop: the last batch served under its encounter ids, their outcomes landed, live figures per version.
    served = out[out.index("POST " + first.group(1) + "/predict_batch") :]
    assert re.search(r"/predict_batch  \(all 1\d,\d\d\d encounters of batch_0002, .*\) → 200", served)
    assert "logged in sqlite:///" in served and "1 row(s) for request demo-1" in served
    # Patient history under the key the demo made for its home: the returning patient's answer used it.
    assert re.search(r"a returning patient: POST .*\(([2-9]|\d\d+)\), their latest encounter sent again → history used: yes", served), served
    key_file = tmp_path / "patient.key"
    assert f"hashes patient identifiers with the key it keeps in {key_file}" in out and len(key_file.read_text()) == 64
    assert key_file.read_text() not in out
    assert re.search(r"landed outcomes_0001\.csv: outcomes of 1\d,\d\d\d served encounters", out)
    assert "ingest_outcomes outcomes_0001" in out
    live = out[out.index("live performance (95 % intervals") :]
    assert re.search(r"^ +v\d+ +1\d,\d\d\d +[\d,]+  0\.\d{3} \[0\.\d{3}–\d\.\d{3}\] +0\.\d{3}", live, re.MULTILINE), live
    # Where to look next, each on its own port.
    for command, port in (("make serve", 3100), ("make app", 8501), ("make ui", 3000), ("make mlflow-ui", 5000)):
        assert re.search(rf"{command} +http://127\.0\.0\.1:{port}$", out, re.MULTILINE), command
    lands_nothing = readmission("outcomes", home=tmp_path)
    assert lands_nothing.returncode == 0 and "outcome has landed already" in lands_nothing.stdout

    again = readmission("status", home=tmp_path)
    assert again.returncode == 0
    assert summary.splitlines()[2] in again.stdout  # the same rows, read back from the instance
    # The warehouse, MLflow's store, Dagster's, the Bentos, the prediction log and the logs, made under umask 0022.
    assert reachable_by_others(tmp_path) == []


def register_two_promoted_versions(home: Path) -> None:
    """Versions 1 and 2 of a small real model, each promoted in turn, in the home's default MLflow store."""
    import numpy as np
    import pandas as pd
    from sklearn.linear_model import LogisticRegression

    from readmission_platform.lib.registry import ModelRegistry
    from readmission_platform.settings import Settings

    settings = Settings.from_env({"READMISSION_HOME": str(home)})
    registry = ModelRegistry(settings.mlflow_tracking_uri, settings.mlflow_artifact_root.as_uri())
    x = pd.DataFrame({"a": np.arange(40.0), "b": np.arange(40.0) % 3})
    model = LogisticRegression().fit(x, np.arange(40) % 2)
    for _ in range(2):
        run_id = registry.log_candidate(
            model, params={}, metrics={}, tags={}, artifacts=None, input_example=x.head(3), run_name="tiny"
        )
        registry.promote(registry.register(run_id, threshold=0.5, tags={}), reason="test promotion")


def test_a_tracking_server_that_is_down_is_named_without_a_traceback(tmp_path):
    from readmission_platform.serving.server import free_port

    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    for command in (("rollback", "--reason", "undo"), ("rollout", "status")):
        # The guard is MLflow's own retries: about two minutes by default, which a person at the prompt is spared.
        done = readmission(*command, home=tmp_path, extra={"READMISSION_MLFLOW_TRACKING_URI": url}, timeout=90)
        assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
        assert done.stderr.startswith(f"readmission {command[0]}: MLflow at {url}: ") and "Connection refused" in done.stderr


def test_rollback_moves_production_back_and_records_why(tmp_path, new_mlflow_store):
    new_mlflow_store(tmp_path / "mlflow" / "mlflow.db")
    register_two_promoted_versions(tmp_path)

    result = readmission("rollback", "--reason", "v2 flags too many patients", home=tmp_path)
    again = readmission("rollback", "--reason", "once more", home=tmp_path)

    assert result.returncode == 0, result.stderr
    assert "production moved back from v2 to v1: v2 flags too many patients" in result.stdout
    assert again.returncode == 2 and "rollback" in again.stderr  # v1 was the first production model
    status = readmission("status", home=tmp_path)
    assert "rolled_back" in status.stdout and "v2 flags too many patients" in status.stdout
    assert "production: v1" in status.stdout


def test_a_rollback_whose_warehouse_cannot_be_reached_leaves_production_where_it_was(tmp_path, new_mlflow_store):
    from readmission_platform.lib.registry import ModelRegistry
    from readmission_platform.settings import Settings

    new_mlflow_store(tmp_path / "mlflow" / "mlflow.db")
    register_two_promoted_versions(tmp_path)
    down = {"READMISSION_WAREHOUSE_URL": "postgresql://nobody@127.0.0.1:1/nothing"}

    result = readmission("rollback", "--reason", "v2 flags too many patients", home=tmp_path, extra=down)

    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr.startswith("readmission rollback: ") and "Traceback" not in result.stderr, result.stderr
    settings = Settings.from_env({"READMISSION_HOME": str(tmp_path)})
    registry = ModelRegistry(settings.mlflow_tracking_uri, settings.mlflow_artifact_root.as_uri())
    assert str(registry.production().version) == "2"  # not moved, as nothing could record why


@pytest.mark.parametrize(
    "args",
    [("land", "--every", "-1"), ("land", "--every", "nan"), ("land", "--every", "inf"), ("ui", "--port", "99999"),
     ("observe", "--pipeline-port", "-1"), ("serve", "--workers", "0", "--source"), ("demo", "--timeout", "0")],
)  # fmt: skip
def test_a_number_out_of_its_range_is_refused_before_anything_runs(args, tmp_path, monkeypatch, capsys):
    from readmission_platform.cli.main import main

    monkeypatch.setenv("READMISSION_HOME", str(tmp_path / "home"))
    with pytest.raises(SystemExit) as stopped:
        main(list(args))

    assert stopped.value.code == 2
    assert f"argument {args[1]}: {args[2]!r}: expected a " in capsys.readouterr().err
    assert not (tmp_path / "home").exists()  # nothing landed, nothing started


@pytest.mark.parametrize(
    ("variable", "url", "said"),
    [("READMISSION_MLFLOW_TRACKING_URI", "postgresql://nobody@127.0.0.1:1/db", "cannot connect to postgresql://***@127.0.0.1:1/db"),
     ("READMISSION_DAGSTER_STORAGE_URL", "postgresql://nobody@127.0.0.1:1/db", "cannot connect to postgresql://***@127.0.0.1:1/db"),
     ("READMISSION_DAGSTER_STORAGE_URL", "notaurl", "READMISSION_DAGSTER_STORAGE_URL is 'notaurl'; expected postgresql://")],
)  # fmt: skip
def test_a_database_store_that_is_down_or_misnamed_is_named_at_once(variable, url, said, tmp_path):
    result = readmission("status", home=tmp_path, extra={variable: url}, timeout=60)

    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr.startswith(f"readmission status: {said}"), result.stderr
    assert "Traceback" not in result.stderr and "retried" not in result.stderr  # MLflow's retries: over a minute


def test_status_names_batches_landed_and_not_ingested_and_claims_no_passed_checks(tmp_path):
    landed = readmission("land", "--count", "2", home=tmp_path)
    assert landed.returncode == 0, landed.stderr

    result = readmission("status", home=tmp_path)

    assert result.returncode == 0, result.stdout + result.stderr
    assert "every check passed" not in result.stdout and "no batch has been ingested yet" in result.stdout
    assert "landed, not ingested yet (or being ingested): batch_0001, batch_0002; " in result.stdout


def test_outcomes_before_anything_was_ingested_says_so_without_a_traceback(tmp_path):
    result = readmission("outcomes", home=tmp_path)

    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr.startswith("readmission outcomes: nothing has been ingested yet"), result.stderr
    assert "Traceback" not in result.stderr
    assert not list((tmp_path / "landing" / "outcomes").glob("*.csv"))


def served_home(home: Path, served: list[str]) -> None:
    """A home whose warehouse holds encounters 1 to 20 (every third readmitted) and whose prediction log holds the
    requests `served` (encounter ids, as the demo sends them)."""
    import polars as pl

    from readmission_platform.lib.encounter import FIELDS
    from readmission_platform.lib.warehouse import open_warehouse
    from readmission_platform.serving.model import SMOKE_ENCOUNTERS
    from readmission_platform.serving.prediction_log import write_predictions

    labels = pl.DataFrame({"encounter_id": range(1, 21), "readmitted_30d": [i % 3 == 0 for i in range(1, 21)]})
    with open_warehouse(f"duckdb:///{home / 'warehouse.duckdb'}") as store:
        store.replace_table("clean_batches", {"encounter_id": pl.Int64(), "readmitted_30d": pl.Boolean()}, labels)
    encounter = {name: SMOKE_ENCOUNTERS[0].get(name) for name in FIELDS}
    write_predictions(f"sqlite:///{home / 'predictions.sqlite'}", (
        {"request_id": request_id, "endpoint": "predict", "model_name": "m", "model_version": "1", "probability": 0.1,
         "decision": False, "risk_band": "low", "inputs": encounter} for request_id in served
    ))  # fmt: skip


def test_outcomes_reads_the_landed_files_by_the_column_name_and_names_a_file_it_cannot_read(tmp_path):
    served_home(tmp_path, [str(i) for i in range(1, 11)])
    folder = tmp_path / "landing" / "outcomes"
    folder.mkdir(parents=True)
    # Column order is free, as for ingestion: encounters 1 to 5 have landed, in the second column.
    (folder / "outcomes_0001.csv").write_text("readmitted_30d,encounter_id,known_at\n" + "".join(f"0,{i},2026-03-01\n" for i in range(1, 6)))
    (folder / "outcomes_0002.csv").write_bytes(b"")
    (folder / "outcomes_0003.csv").write_bytes(b"encounter_id,readmitted_30d,known_at\n6,1,2026-03-01\n\xff\n")

    result = readmission("outcomes", home=tmp_path)

    assert result.returncode == 0, result.stdout + result.stderr
    assert f"warning: {folder / 'outcomes_0002.csv'} is empty" in result.stdout
    assert f"warning: {folder / 'outcomes_0003.csv'} is not UTF-8 text" in result.stdout
    # The files `outcomes` refuses store nothing, so encounter 6 is still due.
    assert "landed outcomes_0004.csv: outcomes of 5 served encounters" in result.stdout
    landed = (folder / "outcomes_0004.csv").read_text().splitlines()
    assert [line.split(",")[0] for line in landed[1:]] == ["6", "7", "8", "9", "10"]
    again = readmission("outcomes", home=tmp_path)
    assert "every served encounter's outcome has landed already (10 served" in again.stdout


@pytest.mark.parametrize(
    ("log", "message"),
    [
        ("postgresql://nobody@127.0.0.1:1/db", "the prediction log at postgresql://***@127.0.0.1:1/db cannot be read: IO: [libpq] Failed to connect"),
        ("garbage", "the prediction log at sqlite:///{home}/garbage.sqlite cannot be read: INVALID_ARGUMENT: [SQLite] Failed to "
                    "prepare query: file is not a database"),
        ("missing", "no prediction log at {home}/nowhere/p.db (from READMISSION_PREDICTION_LOG_URL): nothing has been served"),
    ],
)
def test_outcomes_names_a_prediction_log_it_cannot_read(tmp_path, log, message):
    served_home(tmp_path, [str(i) for i in range(1, 11)])
    if log == "garbage":
        (tmp_path / "garbage.sqlite").write_text("not a database\n" * 100)
        log = f"sqlite:///{tmp_path / 'garbage.sqlite'}"
    elif log == "missing":
        log = f"sqlite:///{tmp_path / 'nowhere' / 'p.db'}"

    result = readmission("outcomes", home=tmp_path, extra={"READMISSION_PREDICTION_LOG_URL": log})

    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr.startswith("readmission outcomes: " + message.format(home=tmp_path)), result.stderr
    assert "Traceback" not in result.stderr
    assert not list((tmp_path / "landing" / "outcomes").glob("*.csv"))


def test_outcomes_says_when_the_log_holds_nothing_served_under_an_encounter_id(tmp_path):
    served_home(tmp_path, ["demo-1"])

    result = readmission("outcomes", home=tmp_path)

    assert result.returncode == 0, result.stdout + result.stderr
    assert "holds no prediction served under an encounter_id (as its request_id): there are no outcomes to land" in result.stdout
    assert "landed already" not in result.stdout


def test_ui_on_a_taken_port_says_so_and_stops(tmp_path):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = readmission("ui", "--port", str(port), home=tmp_path, timeout=60)

    assert result.returncode == 2, result.stdout + result.stderr
    assert f"readmission ui: port {port} is taken" in result.stderr and "--port" in result.stderr
    assert "Dagster UI on" not in result.stdout
    assert not (tmp_path / "logs" / "dagster-webserver.log").exists()  # nothing was started


def test_ui_uses_the_daemon_already_running_on_the_instance_and_starts_one_once_it_stops(tmp_path, monkeypatch):
    """Two daemons on one instance are not supported: while another command's daemon (the demo's) heartbeats, `ui`
    starts only its webserver; once that daemon stops, it starts one. The processes are stand-ins: this is about
    which of them `ui` starts."""
    import threading
    import time

    import dagster as dg
    from dagster._daemon.types import DaemonHeartbeat

    import readmission_platform.cli.demo as demo
    import readmission_platform.cli.main as cli
    import readmission_platform.cli.supervisor as supervisor
    from readmission_platform.cli.instance import prepare_dagster_home
    from readmission_platform.settings import Settings

    entered: list[str] = []
    said: list[str] = []

    class StandIn:
        def __init__(self, name, command, log_path, say, cwd, stopping=None):
            self.name = name

        def __enter__(self):
            entered.append(self.name)
            return self

        def __exit__(self, *exc_info):
            entered.append(f"{self.name} stopped")

    monkeypatch.setattr(supervisor, "Supervised", StandIn)
    monkeypatch.setattr(demo, "Supervised", StandIn)
    monkeypatch.setattr(cli, "_say", said.append)
    monkeypatch.setattr(cli, "DAEMON_CHECK_SECONDS", 0.2, raising=False)
    monkeypatch.setenv("DAGSTER_HOME", "unset")
    settings = Settings.from_env({"READMISSION_HOME": str(tmp_path)})
    prepare_dagster_home(settings)
    with dg.DagsterInstance.get() as instance:
        instance.add_daemon_heartbeat(DaemonHeartbeat(time.time(), "SENSOR", "the-demos-daemon", None))

    problems: list[str] = []

    def meanwhile() -> None:
        def until(condition, what: str) -> bool:
            deadline = time.monotonic() + 30
            while not condition():
                if time.monotonic() > deadline:
                    problems.append(f"not seen within 30 s: {what}; started {entered}, said {said}")
                    return False
                time.sleep(0.05)
            return True

        try:
            if not until(lambda: any(line.startswith("Dagster UI on") for line in said), "the UI's address"):
                return
            time.sleep(0.5)  # a few checks of the other daemon's heartbeat
            if entered != ["dagster-webserver"]:
                problems.append(f"started {entered} while another daemon ran")
                return
            with dg.DagsterInstance.get() as instance:
                instance.wipe_daemon_heartbeats()  # the demo's daemon stopped
            until(lambda: "dagster-daemon" in entered, "a daemon started once the other stopped")
        finally:
            os.kill(os.getpid(), signal.SIGTERM)  # as a stop would: ui's handler ends it

    handlers = {stop: signal.getsignal(stop) for stop in (signal.SIGINT, signal.SIGTERM)}
    watcher = threading.Thread(target=meanwhile)
    watcher.start()
    try:
        assert cli.ui(settings, free_port()) == 0
    finally:
        watcher.join()
    assert problems == []
    assert entered == ["dagster-webserver", "dagster-daemon", "dagster-webserver stopped", "dagster-daemon stopped"]
    assert "a Dagster daemon is already running on this instance; its sensors will do the work" in said
    assert {stop: signal.getsignal(stop) for stop in handlers} == handlers  # the test process's own, given back


def test_serve_without_a_built_bento_says_how_to_get_one(tmp_path):
    result = readmission("serve", home=tmp_path)
    assert result.returncode == 2
    assert f"no Bento 'readmission' in {tmp_path / 'bentoml'}" in result.stderr and "--source" in result.stderr


def shadow_candidate(home: Path) -> None:
    """A small real model as production v1 and candidate v2 in shadow, with 30 healthy shadowed requests logged."""
    import numpy as np
    import pandas as pd
    from sklearn.linear_model import LogisticRegression

    from readmission_platform.lib.encounter import FIELDS
    from readmission_platform.lib.registry import ModelRegistry
    from readmission_platform.serving.model import SMOKE_ENCOUNTERS
    from readmission_platform.serving.prediction_log import write_predictions
    from readmission_platform.settings import Settings

    settings = Settings.from_env({"READMISSION_HOME": str(home)})
    registry = ModelRegistry(settings.mlflow_tracking_uri, settings.mlflow_artifact_root.as_uri())
    x = pd.DataFrame({"a": np.arange(40.0)})
    model = LogisticRegression().fit(x, np.arange(40) % 2)
    versions = [
        registry.register(registry.log_candidate(model, params={}, metrics={}, tags={}, artifacts=None, input_example=x.head(3), run_name="tiny"),
                          threshold=0.5, tags={})
        for _ in range(2)
    ]  # fmt: skip
    registry.promote(versions[0], reason="first model")
    registry.start_shadow(versions[1], reason="better with 95 % confidence")
    encounter = {name: SMOKE_ENCOUNTERS[0].get(name) for name in FIELDS}
    write_predictions(settings.prediction_log_url, (
        {"request_id": f"r{i}", "endpoint": "predict", "model_name": "readmission-classifier", "model_version": "1",
         "probability": 0.1 + i / 100, "decision": False, "risk_band": "low", "inputs": encounter, "stage": "production",
         "shadow_version": "2", "shadow_probability": 0.1 + i / 100, "candidate_ms": 5.0}
        for i in range(30)
    ))  # fmt: skip


def test_rollout_status_advance_and_abort(tmp_path, new_mlflow_store):
    import polars as pl

    from readmission_platform.cli.rollout import rollout
    from readmission_platform.lib.warehouse import open_warehouse
    from readmission_platform.settings import Settings

    new_mlflow_store(tmp_path / "mlflow" / "mlflow.db")
    shadow_candidate(tmp_path)

    status = readmission("rollout", "status", home=tmp_path)
    assert status.returncode == 0, status.stderr
    assert "v2 in shadow since " in status.stdout and "production v1" in status.stdout
    assert "signals: 30 requests, 0 failed (0.0%), p95 5.0 ms" in status.stdout
    assert "next: wait" in status.stdout and "30 of 200 requests" in status.stdout
    assert "limits: agreement at least 80%, PSI at most 0.25 (the policy's: no comparison was kept at its promotion)" in status.stdout

    # The steps in this process (the command's own code): each `readmission` start imports MLflow again.
    settings, said = Settings.from_env({"READMISSION_HOME": str(tmp_path)}), []
    # What its promotion's test comparison foresaw, once kept on the version, sets the limits it is held to.
    from readmission_platform.lib.registry import ModelRegistry
    from readmission_platform.lib.rollout import Foreseen

    registry = ModelRegistry(settings.mlflow_tracking_uri, settings.mlflow_artifact_location)
    registry.annotate("2", Foreseen(agreement=0.6, psi=0.3).as_tags())
    rollout(settings, "status", None, said.append)
    assert said[-2] == ("limits: agreement at least 50% (its test comparison foresaw 60.0%, less 10%), "
                        "PSI at most 0.550 (its test comparison foresaw 0.300, plus 0.25)")  # fmt: skip
    said.clear()
    with pytest.raises(ValueError, match="needs --reason"):
        rollout(settings, "advance", None, said.append)
    assert rollout(settings, "advance", "reviewed the shadow's answers", said.append) == 0
    assert said[-1] == "v2 advanced by hand from shadow to canary at 10%: reviewed the shadow's answers"
    rollout(settings, "status", None, said.append)
    assert "v2 in canary answering 10% of requests" in said[-4]
    assert rollout(settings, "abort", "ward asked to wait", said.append) == 0
    assert said[-1] == "v2 aborted by hand in canary at 10%: ward asked to wait"
    assert rollout(settings, "status", None, said.append) == 0 and said[-1] == "no candidate in shadow or canary; production v1"
    assert rollout(settings, "abort", "again", said.append) == 2

    rows = open_warehouse(settings.warehouse_url).query("SELECT * FROM promotion_decisions ORDER BY decided_at")
    assert rows["action"].to_list() == ["rollout_advanced", "rollout_aborted"]
    assert rows.select(pl.col("rollout_stage"), pl.col("rollout_share")).rows() == [("canary", 0.1), (None, None)]
