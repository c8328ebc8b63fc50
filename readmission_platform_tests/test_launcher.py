"""The platform's run launcher tells run monitoring when a run's worker is dead, which DefaultRunLauncher cannot."""

from __future__ import annotations

import logging
import subprocess
import sys
import textwrap
import time

import dagster as dg
from dagster._core.execution.retries import auto_reexecution_should_retry_run
from dagster._core.launcher import WorkerStatus
from dagster._daemon.monitoring.run_monitoring import monitor_started_run

from readmission_platform.cli.instance import prepare_dagster_home
from readmission_platform.launcher import LocalRunLauncher
from readmission_platform_tests.cli.test_instance import settings_for

# A run worker with no code server behind it: it materializes an asset that sleeps until it is killed.
WORKER = textwrap.dedent(
    """
    import time
    import dagster as dg

    @dg.asset
    def sleeper():
        time.sleep(600)

    with dg.DagsterInstance.get() as instance:
        dg.materialize([sleeper], instance=instance)
    """
)


def started_run(instance) -> dg.DagsterRun | None:
    runs = instance.get_runs(dg.RunsFilter(statuses=[dg.DagsterRunStatus.STARTED]))
    return runs[0] if runs else None


def test_monitoring_fails_the_run_of_a_killed_worker_and_the_run_is_retried(tmp_path, monkeypatch):
    monkeypatch.setenv("DAGSTER_HOME", "unset")
    prepare_dagster_home(settings_for(tmp_path))
    with dg.DagsterInstance.get() as instance:
        assert isinstance(instance.run_launcher, LocalRunLauncher)
        worker = subprocess.Popen([sys.executable, "-c", WORKER])
        try:
            deadline = time.monotonic() + 120
            while (run := started_run(instance)) is None:
                assert worker.poll() is None and time.monotonic() < deadline, "the worker's run never started"
                time.sleep(0.2)
            assert instance.run_launcher.check_run_worker_health(run).status == WorkerStatus.RUNNING

            worker.kill()
            time.sleep(0.5)  # not reaped yet: a zombie, as a worker whose code server died stays
            health = instance.run_launcher.check_run_worker_health(run)
            assert health.status == WorkerStatus.FAILED and f"pid {worker.pid}" in health.msg
        finally:
            worker.kill()
            worker.wait()

        monitor_started_run(instance, None, instance.get_run_records(dg.RunsFilter(run_ids=[run.run_id]))[0], logging.getLogger())

        failed = instance.get_run_by_id(run.run_id)
        assert failed.status == dg.DagsterRunStatus.FAILURE
        assert auto_reexecution_should_retry_run(instance, failed, None)
