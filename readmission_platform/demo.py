"""`readmission demo`: land batches and let the running sensors process them, headless, with progress."""

from __future__ import annotations

import subprocess
import sys
import time
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

import dagster as dg

from readmission_platform.instance import REPO_ROOT
from readmission_platform.lib.landing import content_hash, landed_files
from readmission_platform.report import FINISHED, PARTITION_TAG

SHA_TAG = "readmission/sha256"


def daemon_is_alive(instance: dg.DagsterInstance, within_seconds: float = 60) -> bool:
    """A daemon (the UI's, say) already heartbeats on this instance: use it rather than start another."""
    heartbeats = instance.get_daemon_heartbeats()
    now = datetime.now(UTC).timestamp()
    return any(now - beat.timestamp < within_seconds for beat in heartbeats.values())


@contextmanager
def running_daemon(instance: dg.DagsterInstance, log_path: Path, say):
    """Run `dagster-daemon` on this instance for the duration, unless one is already running."""
    if daemon_is_alive(instance):
        say("a Dagster daemon is already running on this instance; its sensors will do the work")
        yield
        return
    log_path.parent.mkdir(parents=True, exist_ok=True)
    executable = Path(sys.executable).with_name("dagster-daemon")
    with open(log_path, "ab") as log:
        daemon = subprocess.Popen(
            [str(executable), "run", "-w", str(REPO_ROOT / "workspace.yaml")],
            cwd=REPO_ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    say(f"started the Dagster daemon (sensors, run queue); its log: {log_path}")
    try:
        yield
    finally:
        daemon.terminate()
        try:
            daemon.wait(timeout=30)
        except subprocess.TimeoutExpired:
            daemon.kill()
        # Its last heartbeat would make the next demo believe a daemon is still running.
        instance.wipe_daemon_heartbeats()


def wait_for_batches(
    instance: dg.DagsterInstance, landing_dir: Path, say, timeout_seconds: float, log_path: Path
) -> None:
    """Print each run's progress until every landed file's current content has a finished run."""
    wanted = {content_hash(p.read_bytes()): p.name for p in landed_files(landing_dir)}
    shown: dict[str, str] = {}
    deadline = time.monotonic() + timeout_seconds
    while True:
        finished = set()
        for run in reversed(instance.get_runs(dg.RunsFilter(tags={SHA_TAG: list(wanted)}), limit=500)):
            state = run.status.value.lower()
            if shown.get(run.run_id) != state:
                shown[run.run_id] = state
                say(f"  {run.tags.get(PARTITION_TAG, '?'):<12} run {run.run_id[:8]} {state}")
            if run.status in FINISHED:
                finished.add(run.tags[SHA_TAG])
        if finished >= set(wanted):
            return
        if time.monotonic() > deadline:
            missing = sorted(wanted[sha] for sha in set(wanted) - finished)
            raise TimeoutError(
                f"after {timeout_seconds:.0f} s no finished run yet for {missing}; see {log_path} and `make ui`"
            )
        time.sleep(1)
