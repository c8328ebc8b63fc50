"""`readmission demo`: land batches one at a time and let the running sensors ingest and retrain, headless."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

import dagster as dg

from readmission_platform.cli.instance import REPO_ROOT
from readmission_platform.cli.report import FINISHED
from readmission_platform.cli.supervisor import Supervised
from readmission_platform.defs import run_tags
from readmission_platform.lib.landing import batch_id_for, content_hash


def daemon_is_alive(instance: dg.DagsterInstance, within_seconds: float = 60) -> bool:
    """A daemon (the UI's, say) already heartbeats on this instance: use it rather than start another."""
    heartbeats = instance.get_daemon_heartbeats()
    now = datetime.now(UTC).timestamp()
    return any(now - beat.timestamp < within_seconds for beat in heartbeats.values())


def daemon_command() -> list[str]:
    return [str(Path(sys.executable).with_name("dagster-daemon")), "run", "-w", str(REPO_ROOT / "workspace.yaml")]


@contextmanager
def running_daemon(instance: dg.DagsterInstance, log_path: Path, say):
    """Run `dagster-daemon` on this instance for the duration, started again if it dies, unless one is already
    running; yields its supervisor (None when another daemon does the work)."""
    if daemon_is_alive(instance):
        say("a Dagster daemon is already running on this instance; its sensors will do the work")
        yield None
        return
    try:
        with Supervised("dagster-daemon", daemon_command(), log_path, say, REPO_ROOT) as daemon:
            say(f"started the Dagster daemon (sensors, run queue, run monitoring and retries); its log: {log_path}")
            yield daemon
    finally:
        # Its last heartbeat would make the next demo believe a daemon is still running.
        instance.wipe_daemon_heartbeats()


def settled(runs: list[dg.DagsterRun]) -> bool:
    """Every run finished, and none failed with an automatic retry still to come (the daemon starts it)."""
    retried = {run.parent_run_id for run in runs}
    return all(run.status in FINISHED for run in runs) and not any(
        run.status == dg.DagsterRunStatus.FAILURE and run.tags.get(run_tags.WILL_RETRY) == "true" and run.run_id not in retried
        for run in runs
    )


class RunWatcher:
    """Prints each run's status changes, and waits for runs that match a filter to finish."""

    def __init__(self, instance: dg.DagsterInstance, say):
        self.instance, self.say = instance, say
        self.shown: dict[str, str] = {}

    def _label(self, run: dg.DagsterRun) -> str:
        if run_tags.PARTITION in run.tags:
            return f"{run.job_name} {run.tags[run_tags.PARTITION]}"
        trigger = run.tags.get(run_tags.TRIGGER)
        return f"{run.job_name} (after {run.tags.get(run_tags.NEWEST_BATCH, '?')}, {trigger})" if trigger else run.job_name

    def wait(self, tags: dict, describe: str, timeout: float, log_path: Path, appear_within: float | None = None):
        """The finished runs tagged `tags`; None when `appear_within` seconds pass and no such run exists."""
        started = time.monotonic()
        while True:
            runs = self.instance.get_runs(dg.RunsFilter(tags=tags), limit=100)
            for run in reversed(runs):
                state = run.status.value.lower()
                if self.shown.get(run.run_id) != state:
                    self.shown[run.run_id] = state
                    self.say(f"  {self._label(run):<44} run {run.run_id[:8]} {state}")
            if runs and settled(runs):
                return runs
            waited = time.monotonic() - started
            if not runs and appear_within is not None and waited > appear_within:
                return None
            if waited > timeout:
                raise TimeoutError(f"after {timeout:.0f} s {describe} has not finished; see {log_path} and `make ui`")
            time.sleep(1)


def land_and_process(
    land_one: Callable[[], list], instance: dg.DagsterInstance, say, timeout: float, log_path: Path
) -> int:
    """Land one batch at a time; after each, wait for its ingest run and for the retrain it triggers."""
    watcher = RunWatcher(instance, say)
    landed_count = 0
    while landed := land_one():
        landed_count += 1
        batch = landed[0]
        say(f"landed {batch.path.name} ({batch.rows:,} encounters)")
        watcher.wait({run_tags.SHA: content_hash(batch.path.read_bytes())}, f"ingestion of {batch.path.name}", timeout, log_path)
        found = watcher.wait(
            {run_tags.NEWEST_BATCH: batch_id_for(batch.path)}, f"the retrain after {batch.path.name}", timeout, log_path, appear_within=90
        )
        if found is None:
            say("  retrain_sensor started no retrain (see its skip reason under Automation in the UI)")
    return landed_count


def wait_for_live_performance(path: Path, instance: dg.DagsterInstance, say, timeout: float, log_path: Path) -> None:
    """Wait for the ingestion of a landed file of outcomes and for the measurement of live performance after it."""

    watcher = RunWatcher(instance, say)
    watcher.wait({run_tags.SHA: content_hash(path.read_bytes())}, f"ingestion of {path.name}", timeout, log_path)
    found = watcher.wait({run_tags.AFTER_OUTCOMES: batch_id_for(path)}, f"live performance after {path.name}", timeout, log_path,
                         appear_within=120)  # fmt: skip
    if found is None:
        say("  live_performance_sensor started no measurement (see its ticks under Automation in the UI)")


def serve_last_batch(settings, say) -> bool:
    """Start `bentoml serve readmission:latest` (the Bento serving_bento built), send it one encounter of the last
    batch and then all of them at once, each under its encounter_id as the request_id, as a hospital system would;
    print the first answer and stop the server; False if anything failed."""
    import httpx

    from readmission_platform.lib.encounter import from_clean
    from readmission_platform.lib.predictions import read_predictions
    from readmission_platform.lib.warehouse import open_warehouse
    from readmission_platform.serving.server import BENTO, running_server

    with open_warehouse(settings.warehouse_url) as store:
        newest = store.query("SELECT max(batch_id) AS b FROM clean_batches")["b"][0]
        rows = store.query("SELECT * FROM clean_batches WHERE batch_id = $1 ORDER BY encounter_id", [newest])
    encounters = [from_clean(row) | {"request_id": str(row["encounter_id"])} for row in rows.iter_rows(named=True)]
    first = encounters[0] | {"request_id": "demo-1"}
    say(f"\nserving: `bentoml serve {BENTO}` from {settings.bentoml_home} …")
    try:
        with running_server(settings, bento=BENTO) as url:
            answer = httpx.post(f"{url}/predict", json=first, timeout=30)
            say(f"POST {url}/predict  (encounter {rows['encounter_id'][0]} of {newest}: {first['age']}, "
                f"{first['gender']}, {first['time_in_hospital']} days, diag_1 {first['diag_1']})")  # fmt: skip
            say(f"  → {answer.status_code} {answer.text}")
            info = httpx.get(f"{url}/model", timeout=30).json()
            say(f"  served by {info['name']} v{info['version']} ({info['family']}), threshold {info['threshold']:.3f}")
            batch = httpx.post(f"{url}/predict_batch", json={"encounters": encounters}, timeout=300)
            say(f"POST {url}/predict_batch  (all {len(encounters):,} encounters of {newest}, each under its "
                f"encounter_id as the request_id) → {batch.status_code}")  # fmt: skip
    except (RuntimeError, TimeoutError, httpx.HTTPError) as error:
        say(f"  serving failed: {error}")
        return False
    logged = read_predictions(settings.prediction_log_url, ["request_id"])["request_id"]
    served = logged.filter(logged.is_in([e["request_id"] for e in encounters])).n_unique()
    say(f"  logged in {settings.prediction_log_url}: {int((logged == 'demo-1').sum())} row(s) for request demo-1; "
        f"{served:,} of the batch's {len(encounters):,} encounters")  # fmt: skip
    return answer.status_code == 200 and batch.status_code == 200 and served > 0


def land_served_outcomes(settings, say) -> Path | None:
    """Land, as the hospital system would 30 days on, the outcomes of the encounters served under their
    encounter_id that have none yet (landed or stored), taken from the data set's labels; the file, or None."""
    import polars as pl

    from readmission_platform.lib.landing import landed_files
    from readmission_platform.lib.outcomes import OUTCOMES, land_outcomes, outcomes_csv
    from readmission_platform.lib.predictions import read_predictions
    from readmission_platform.lib.warehouse import open_warehouse

    served = (
        read_predictions(settings.prediction_log_url, ["request_id"])
        .filter(pl.col("request_id").str.contains(r"^[1-9][0-9]{0,17}$"))
        .select(pl.col("request_id").cast(pl.Int64).alias("encounter_id"))
        .unique()
    )
    folder = settings.landing_dir / "outcomes"
    landed = [pl.read_csv(path, columns=[0], infer_schema=False).to_series() for path in landed_files(folder)]
    with open_warehouse(settings.warehouse_url) as store:
        stored = store.query(f"SELECT request_id FROM {OUTCOMES}")
        labels = store.query("SELECT encounter_id, readmitted_30d FROM clean_batches")
    known = pl.concat([pl.Series([], dtype=pl.String), *landed, *([stored["request_id"]] if stored.width else [])])
    due = labels.join(served, on="encounter_id").filter(
        ~pl.col("encounter_id").is_in(known.cast(pl.Int64, strict=False).drop_nulls().implode())
    )
    if due.is_empty():
        say(f"every served encounter's outcome has landed already ({served.height:,} served under their encounter_id)")
        return None
    path = land_outcomes(outcomes_csv(due.sort("encounter_id"), datetime.now(UTC)), folder)
    say(f"landed {path.name}: outcomes of {due.height:,} served encounters ({int(due['readmitted_30d'].sum()):,} readmitted within 30 days)")
    return path
