"""kill -9 of the platform's processes under a real daemon: the platform heals by itself (`make chaos`).

A `sitecustomize.py` on the processes' PYTHONPATH wraps the DuckDB warehouse's batch transaction and BentoML's copy of a
Bento into its store: when the file `point` in the test's control folder names `before_commit`, `after_commit` or
`bento_copy`, the first process to get there SIGKILLs itself at that point; at `stall` it writes its pid into the
marker and waits inside the transaction to be killed (a marker file makes each once only, so the retry gets through).
"""

from __future__ import annotations

import os
import signal
import sys
import textwrap
import time

import dagster as dg
import psutil
import pytest

from readmission_platform.cli.demo import running_daemon
from readmission_platform.cli.report import FINISHED
from readmission_platform.cli.instance import prepare_dagster_home
from readmission_platform.defs import run_tags
from readmission_platform.lib.landing import split_batches
from readmission_platform.lib.registry import RUN_GROUP_TAG, ModelRegistry
from readmission_platform.lib.warehouse import open_warehouse
from readmission_platform.settings import Settings

pytestmark = pytest.mark.chaos

BATCH = 3_000
RECOVERY_SECONDS = 240  # a run retried and done, or a code server back (the daemon reloads its workspace each 60 s)

SITECUSTOMIZE = textwrap.dedent(
    '''
    import contextlib
    import os
    import shutil
    import signal
    import time
    from pathlib import Path

    CONTROL = Path(os.environ["READMISSION_CHAOS_DIR"])


    def _first_at(point):
        wanted = CONTROL / "point"
        if not wanted.exists() or wanted.read_text().strip() != point:
            return False
        try:
            (CONTROL / f"killed-{point}").touch(exist_ok=False)
        except FileExistsError:
            return False
        return True


    def _die_at(point):
        if _first_at(point):
            os.kill(os.getpid(), signal.SIGKILL)


    def _stall_at(point):
        if _first_at(point):
            (CONTROL / f"killed-{point}").write_text(str(os.getpid()))
            time.sleep(600)


    copy = shutil.copy


    def copy_then_die(source, destination, **kwargs):
        copied = copy(source, destination, **kwargs)
        if os.path.basename(str(copied)) == "bento.yaml":
            _die_at("bento_copy")
        return copied


    shutil.copy = copy_then_die


    def _patch():
        from readmission_platform.lib.warehouse import DuckDBWarehouse
        from readmission_platform.lib.warehouse.duckdb import _Load

        batch_writer, commit = DuckDBWarehouse.batch_writer, _Load.commit

        @contextlib.contextmanager
        def chaotic_batch_writer(self, batch_id):
            with batch_writer(self, batch_id) as writer:
                yield writer
            _die_at("after_commit")

        def chaotic_commit(self):
            for load in self.loads:
                load.result()
            _die_at("before_commit")  # the batch's rows are inserted, the transaction not committed
            _stall_at("stall")
            commit(self)

        DuckDBWarehouse.batch_writer, _Load.commit = chaotic_batch_writer, chaotic_commit


    try:
        _patch()
    except ImportError:
        pass
    '''
)


@pytest.fixture
def chaos_home(tmp_path, monkeypatch, full_source_bytes):
    """A platform home with four 3,000-encounter batches to land, and the kill hook on every process's path."""
    hooks, control = tmp_path / "hooks", tmp_path / "control"
    hooks.mkdir()
    control.mkdir()
    (hooks / "sitecustomize.py").write_text(SITECUSTOMIZE)
    for name in [k for k in os.environ if k.startswith(("READMISSION_", "DAGSTER_"))]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("READMISSION_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("READMISSION_CHAOS_DIR", str(control))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(hooks), os.environ.get("PYTHONPATH")])))
    monkeypatch.setenv("DAGSTER_HOME", "unset")
    settings = Settings.from_env()
    prepare_dagster_home(settings)
    settings.landing_dir.mkdir(parents=True)
    lines = full_source_bytes.splitlines(keepends=True)
    return settings, control, split_batches(b"".join(lines[: 4 * BATCH + 1]), BATCH)


def wait_for(what: str, condition, seconds: float = RECOVERY_SECONDS):
    """Poll `condition` until it gives something true; that value, and the seconds it took."""
    started = time.monotonic()
    while not (found := condition()):
        assert time.monotonic() - started < seconds, f"not within {seconds} s: {what}"
        time.sleep(0.5)
    return found, time.monotonic() - started


def run_worker_pid(instance, run_id: str, step: str) -> int | None:
    """The pid of the process running `step` of the run, once the step started."""
    for record in instance.all_logs(run_id, of_type=dg.DagsterEventType.STEP_START):
        if record.dagster_event.step_key == step:
            return record.dagster_event.pid
    return None


def code_servers(daemon_pid: int) -> list[psutil.Process]:
    return [p for p in psutil.Process(daemon_pid).children(recursive=True) if "grpc" in " ".join(p.cmdline())]


def describe(runs: list[dg.DagsterRun]) -> str:
    return "; ".join(f"{r.run_id[:8]} {r.status.value} {r.tags.get('dagster/failure_reason')} retry {r.tags.get('dagster/will_retry')}" for r in runs)


def batch_runs(instance, batch_id: str) -> list[dg.DagsterRun]:
    return instance.get_runs(dg.RunsFilter(job_name="ingest_batch", tags={run_tags.PARTITION: batch_id}))


def decided(runs: list[dg.DagsterRun]) -> bool:
    """Every run finished, and each failed run (newest first) followed by a run that succeeded, or else tagged whether
    it will be retried (the tag follows the failure by a moment), with its retry among the runs if it will. A run that
    fails while the code server is down may never be tagged, or be tagged for a retry that Dagster's retry daemon then
    never launches (seen in a CI run: `dagster/will_retry` true, no retry four minutes on); the landing sensor's new run
    ingests the batch either way."""
    retried = {run.parent_run_id for run in runs}
    return all(run.status in FINISHED for run in runs) and all(
        r.status != dg.DagsterRunStatus.FAILURE
        or any(newer.status == dg.DagsterRunStatus.SUCCESS for newer in runs[:i])
        or (run_tags.WILL_RETRY in r.tags and (r.tags[run_tags.WILL_RETRY] != "true" or r.run_id in retried))
        for i, r in enumerate(runs)
    )  # fmt: skip


def started(instance, batch_id: str):
    return [r for r in batch_runs(instance, batch_id) if r.status == dg.DagsterRunStatus.STARTED]


def ingested(instance, batch_id: str):
    runs = batch_runs(instance, batch_id)
    return runs if runs and decided(runs) and runs[0].status == dg.DagsterRunStatus.SUCCESS else None


def retrains_settled(instance, newest_batch: str):
    runs = instance.get_runs(dg.RunsFilter(job_name="retrain", tags={"readmission/newest_batch": newest_batch}))
    return runs if runs and decided(runs) else None


def test_kill_9_anywhere_and_the_platform_heals_by_itself(chaos_home):
    settings, control, data = chaos_home
    said: list[str] = []
    recovery: dict[str, float] = {}
    with dg.DagsterInstance.get() as instance, running_daemon(instance, settings.home / "logs" / "dagster-daemon.log", said.append) as daemon:
        # 1. The run worker dies inside the batch's transaction, before the commit.
        (control / "point").write_text("before_commit")
        (settings.landing_dir / "batch_0001.csv").write_bytes(data[0])
        runs, recovery["run worker killed before the commit"] = wait_for("batch_0001 ingested", lambda: ingested(instance, "batch_0001"))
        assert (control / "killed-before_commit").exists() and len(runs) == 2

        # 3. The run worker of the retrain dies while training; the retry's packer dies copying the Bento into the store.
        (control / "point").write_text("bento_copy")
        retrain = wait_for("a retrain after batch_0001", lambda: instance.get_runs(dg.RunsFilter(job_name="retrain"), limit=1))[0][0]
        pid = wait_for("trained_model started", lambda: run_worker_pid(instance, retrain.run_id, "trained_model"))[0]
        os.kill(pid, signal.SIGKILL)
        killed = time.monotonic()
        runs = wait_for("the retrain retried", lambda: retrains_settled(instance, "batch_0001"))[0]
        recovery["run worker killed in a retrain"] = time.monotonic() - killed
        assert [r.status for r in runs] == [dg.DagsterRunStatus.SUCCESS, dg.DagsterRunStatus.FAILURE], describe(runs)
        assert (control / "killed-bento_copy").exists()

        # 2. The run worker dies after the commit, before Dagster records the materialization.
        (control / "point").write_text("after_commit")
        (settings.landing_dir / "batch_0002.csv").write_bytes(data[1])
        runs, recovery["run worker killed after the commit"] = wait_for("batch_0002 ingested", lambda: ingested(instance, "batch_0002"))
        assert (control / "killed-after_commit").exists() and len(runs) == 2
        wait_for("the retrain after batch_0002", lambda: retrains_settled(instance, "batch_0002"))

        # The daemon dies while a batch's run is in flight: its supervisor starts it again, and the run goes on.
        (settings.landing_dir / "batch_0003.csv").write_bytes(data[2])
        wait_for("batch_0003 started", lambda: started(instance, "batch_0003"))
        first_daemon = daemon.pid
        os.kill(first_daemon, signal.SIGKILL)
        killed = time.monotonic()
        wait_for("the daemon started again", lambda: daemon.restarts == 1, 30)
        wait_for("batch_0003 ingested", lambda: ingested(instance, "batch_0003"))
        recovery["daemon killed with a run in flight (to the batch ingested)"] = time.monotonic() - killed
        wait_for("the retrain after batch_0003", lambda: retrains_settled(instance, "batch_0003"))

        # The code server dies while a batch's worker waits in its transaction, then the worker dies: the launcher's
        # health check fails the run, and the retry daemon's retry or, when the code server is still down, the landing
        # sensor's new run ingests the batch; the daemon starts another code server when it next reloads its workspace.
        (control / "point").write_text("stall")
        (settings.landing_dir / "batch_0004.csv").write_bytes(data[3])
        marker = control / "killed-stall"
        worker = int(wait_for("batch_0004's worker waiting", lambda: marker.exists() and marker.read_text())[0])
        server = code_servers(daemon.pid)[0]
        server.kill()
        server.wait(10)
        os.kill(worker, signal.SIGKILL)
        killed = time.monotonic()
        runs = wait_for("batch_0004 ingested", lambda: ingested(instance, "batch_0004"))[0]
        recovery["code server, then the run worker killed (to the batch ingested)"] = time.monotonic() - killed
        assert runs[-1].status == dg.DagsterRunStatus.FAILURE and len(runs) >= 2, describe(runs)
        assert server.pid not in {p.pid for p in code_servers(daemon.pid)}
        wait_for("the retrain after batch_0004", lambda: retrains_settled(instance, "batch_0004"))

        assert daemon.restarts == 1 and daemon.pid != first_daemon
        assert f"dagster-daemon (pid {first_daemon}) exited with code -9" in said[1]
        info = instance.event_log_storage.get_concurrency_info("warehouse")
        assert info.claimed_slots == [] and info.pending_steps == []

    with open_warehouse(settings.warehouse_url) as store:
        raw = store.query("SELECT batch_id, count(*) AS n, count(DISTINCT encounter_id) AS ids FROM raw_batches GROUP BY 1 ORDER BY 1")
        clean = store.query("SELECT batch_id, count(*) AS n FROM clean_batches GROUP BY 1 ORDER BY 1")
        features = store.query("SELECT batch_id, count(*) AS n FROM features GROUP BY 1 ORDER BY 1")
        duplicates = store.query("SELECT count(*) - count(DISTINCT encounter_id) AS d FROM raw_batches")["d"][0]
        trained_on = set(store.query("SELECT DISTINCT batch_id FROM training_set")["batch_id"])
    batches = ["batch_0001", "batch_0002", "batch_0003", "batch_0004"]
    assert raw["batch_id"].to_list() == batches and raw["n"].to_list() == [BATCH] * 4 and raw["ids"].to_list() == [BATCH] * 4
    assert duplicates == 0
    assert clean.rows() == features.rows()
    with dg.DagsterInstance.get() as instance:
        for asset, table in (("raw_batches", raw), ("features", features)):
            recorded = instance.get_materialized_partitions(dg.AssetKey(asset))
            assert recorded == set(batches), asset
            for batch_id, rows in table.select("batch_id", "n").rows():
                newest = instance.fetch_materializations(
                    dg.AssetRecordsFilter(asset_key=dg.AssetKey(asset), asset_partitions=[batch_id]), limit=1
                ).records[0]
                assert newest.asset_materialization.metadata["dagster/row_count"].value == rows
    assert trained_on == set(batches)
    # One version per retrain's run group, no MLflow run left RUNNING by a killed worker, no Bento half-copied.
    registry = ModelRegistry(settings.mlflow_tracking_uri, settings.mlflow_artifact_root.as_uri())
    groups = [v.tags[RUN_GROUP_TAG] for v in registry.versions()]
    assert len(groups) == len(set(groups))
    assert not registry.client.search_runs([registry.experiment_id], "attributes.status = 'RUNNING'")
    bentos = settings.bentoml_home / "bentos" / "readmission"
    assert all((entry / "src" / "readmission_platform" / "serving" / "service.py").is_file() for entry in bentos.iterdir() if entry.is_dir())
    for what, seconds in recovery.items():
        print(f"recovery: {what}: {seconds:.0f} s", file=sys.stderr)
    assert recovery and all(seconds < RECOVERY_SECONDS for seconds in recovery.values())
