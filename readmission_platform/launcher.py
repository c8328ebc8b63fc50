"""The platform's run launcher: Dagster's DefaultRunLauncher, and a health check of each run's worker for run monitoring."""

from __future__ import annotations

import dagster as dg
import psutil

# The one private Dagster import in the platform: a run launcher's health check answers with these two types, which
# Dagster exports nowhere else (its own Docker and Kubernetes launchers import them from here too).
from dagster._core.launcher import CheckRunHealthResult, WorkerStatus

# psutil derives a process's start time from clock ticks since boot: allow for its rounding.
START_TIME_SLACK_SECONDS = 1.0


class LocalRunLauncher(dg.DefaultRunLauncher):
    """Launches runs on the code servers as DefaultRunLauncher does; tells run monitoring when a run's worker is gone.

    Without a health check a worker killed after its code server died stays STARTED forever, as only the code server
    watched it. The daemon, code servers and run workers share one machine, so the worker's pid is a reliable signal.
    """

    @property
    def supports_check_run_worker_health(self) -> bool:
        return True

    def check_run_worker_health(self, run: dg.DagsterRun) -> CheckRunHealthResult:
        started = self._instance.get_records_for_run(run.run_id, of_type=dg.DagsterEventType.RUN_START, limit=1).records
        if not started:
            return CheckRunHealthResult(WorkerStatus.RUNNING, "the run's worker has not recorded its start yet")
        # Every event names the process that reported it; RUN_START comes from the run worker.
        record = started[0]
        pid = record.event_log_entry.dagster_event.pid
        try:
            process = psutil.Process(pid)
            # A worker killed after its code server died is a zombie until something reaps it; a process started
            # after the run did has only been given the dead worker's pid.
            alive = process.status() != psutil.STATUS_ZOMBIE and process.create_time() < record.timestamp + START_TIME_SLACK_SECONDS
        except psutil.NoSuchProcess:
            alive = False
        if alive:
            return CheckRunHealthResult(WorkerStatus.RUNNING)
        return CheckRunHealthResult(WorkerStatus.FAILED, f"the run worker (pid {pid}) is no longer running")
