"""`readmission demo`: land batches one at a time and let the running sensors ingest and retrain, headless, while a
`bentoml serve` started before the first promotion follows the alias `production` and answers from then on."""

from __future__ import annotations

import os
import secrets
import socket
import sys
import threading
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
from readmission_platform.defs.training.sensors import retrain_job
from readmission_platform.lib.landing import batch_id_for, content_hash

# How often the demo's service checks the alias (the platform's default is 30 s): a promotion answers within seconds.
RELOAD_SECONDS = 2
# retrain_sensor ticks every 5 s, but on two loaded cores one evaluation was seen to take minutes: a retrain it requests
# is a run well within this, unless it skipped.
RETRAIN_APPEARS_WITHIN = 300
# history_sensor asks for a run once a batch is loaded, and the run queues behind the warehouse's other writers.
HISTORY_APPEARS_WITHIN = 300
# Where the demo keeps the key it hashes patient identifiers with when READMISSION_PATIENT_KEY is not set.
PATIENT_KEY_FILE = "patient.key"
# Encounters sent at each poll while a candidate is in shadow or canary, as a hospital's traffic would be.
TRAFFIC_REQUESTS = 200


def demo_patient_key(home: Path) -> tuple[str, Path]:
    """The key the demo hashes patient identifiers with when READMISSION_PATIENT_KEY is not set, and its file: made
    once for the home, readable by its owner only, and read again by later demos, so that the history stored under
    it stays valid."""
    path = home / PATIENT_KEY_FILE
    home.mkdir(parents=True, exist_ok=True)
    try:
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        pass  # made by an earlier demo
    else:
        with os.fdopen(descriptor, "w") as file:
            file.write(secrets.token_hex(32))
    return path.read_text().strip(), path


def daemon_is_alive(instance: dg.DagsterInstance, within_seconds: float = 60) -> bool:
    """A daemon (the UI's, say) already heartbeats on this instance: use it rather than start another."""
    heartbeats = instance.get_daemon_heartbeats()
    now = datetime.now(UTC).timestamp()
    return any(now - beat.timestamp < within_seconds for beat in heartbeats.values())


def port_is_free(port: int) -> bool:
    """Nothing listens on 127.0.0.1:`port` yet."""
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def daemon_command() -> list[str]:
    return [str(Path(sys.executable).with_name("dagster-daemon")), "run", "-w", str(REPO_ROOT / "workspace.yaml")]


@contextmanager
def running_daemon(instance: dg.DagsterInstance, log_path: Path, say, stopping: threading.Event | None = None):
    """Run `dagster-daemon` on this instance for the duration, started again if it dies (until `stopping`, shared with
    other supervised processes, is set), unless one is already running; yields its supervisor (None when another
    daemon does the work)."""
    if daemon_is_alive(instance):
        say("a Dagster daemon is already running on this instance; its sensors will do the work")
        yield None
        return
    try:
        with Supervised("dagster-daemon", daemon_command(), log_path, say, REPO_ROOT, stopping) as daemon:
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
    """Prints each run's status changes, and waits for runs that match a filter to finish; `tick` is called about once
    a second while it waits (the demo asks its service which version answers)."""

    def __init__(self, instance: dg.DagsterInstance, say, tick: Callable[[], None] = lambda: None):
        self.instance, self.say, self.tick = instance, say, tick
        self.shown: dict[str, str] = {}

    def _label(self, run: dg.DagsterRun) -> str:
        if run_tags.PARTITION in run.tags:
            return f"{run.job_name} {run.tags[run_tags.PARTITION]}"
        trigger = run.tags.get(run_tags.TRIGGER)
        return f"{run.job_name} (after {run.tags.get(run_tags.NEWEST_BATCH, '?')}, {trigger})" if trigger else run.job_name

    def show(self) -> None:
        """Print the status changes of the recent runs, whichever job they belong to (ingests and retrains overlap)."""
        for run in reversed(self.instance.get_runs(limit=20)):
            state = run.status.value.lower()
            if self.shown.get(run.run_id) != state:
                self.shown[run.run_id] = state
                self.say(f"  {self._label(run):<44} run {run.run_id[:8]} {state}")

    def wait(self, runs_filter: dg.RunsFilter | dict, describe: str, timeout: float, log_path: Path,
             appear_within: float | None = None, until: Callable[[], bool] = lambda: False) -> list[dg.DagsterRun] | None:  # fmt: skip
        """The finished runs that match `runs_filter` (or carry the tags given as a dict), or those so far once
        `until()` holds; None when `appear_within` seconds pass and no such run exists."""
        runs_filter = dg.RunsFilter(tags=runs_filter) if isinstance(runs_filter, dict) else runs_filter
        started = time.monotonic()
        while True:
            self.show()
            runs = self.instance.get_runs(runs_filter, limit=100)
            if runs and settled(runs) or until():
                return runs
            waited = time.monotonic() - started
            if not runs and appear_within is not None and waited > appear_within:
                return None
            if waited > timeout:
                raise TimeoutError(f"after {timeout:.0f} s {describe} has not finished; see {log_path} and `make ui`")
            self.tick()
            time.sleep(1)


class Progress:
    """Writes each line of the demo under the time since it started, its stage and how many batches have landed."""

    def __init__(self, batches: int, write: Callable[[str], None], clock: Callable[[], float] = time.monotonic):
        self.batches, self.write, self.clock = batches, write, clock
        self.started = clock()
        self.stage, self.landed = "start", 0

    @property
    def elapsed(self) -> float:
        return self.clock() - self.started

    def __call__(self, message: str) -> None:
        self.write(f"[{self.elapsed:4.0f} s] {self.stage:<11} batch {self.landed}/{self.batches}  {message}")


def sample_encounter(settings) -> tuple[dict, str] | None:
    """The request a hospital system would send for the first stored encounter, and a description of it for a
    newcomer; None while no batch is stored."""
    from readmission_platform.lib.encounter import from_clean
    from readmission_platform.lib.warehouse import open_warehouse

    with open_warehouse(settings.warehouse_url) as store:
        if "clean_batches" not in store.tables():
            return None
        rows = store.query("SELECT * FROM clean_batches ORDER BY batch_id, encounter_id LIMIT 1")
    if rows.is_empty():
        return None
    row = rows.row(0, named=True)
    encounter = from_clean(row)
    about = (f"encounter {row['encounter_id']} of {row['batch_id']}: {encounter['age']}, {encounter['gender']}, "
             f"{encounter['time_in_hospital']} days, diag_1 {encounter['diag_1']}")  # fmt: skip
    return encounter, about


class FollowedService:
    """The demo's `bentoml serve`, which follows the alias `production`: asks it which version answers and sends the
    same encounter to each version it sees, so the newcomer watches the served version change without a restart."""

    def __init__(self, url: str, log_path: Path, say):
        self.url, self.log_path, self.say = url, log_path, say
        self.encounter: tuple[dict, str] | None = None  # set once a batch is stored
        self.traffic: list[dict] = []  # real encounters sent while a candidate is in rollout
        self.answers: list[dict] = []  # the /predict answer of each version seen, in order
        self.candidate: dict | None = None  # /model's `candidate` at the last poll
        self.sent = 0

    @property
    def version(self) -> str | None:
        return self.answers[-1]["model_version"] if self.answers else None

    def poll(self) -> None:
        """Ask which version answers; when it is a new one, send it the encounter and print what it said."""
        import httpx

        if self.encounter is None:
            return
        encounter, about = self.encounter
        request_id = f"demo-{len(self.answers) + 1}"
        try:
            model = httpx.get(f"{self.url}/model", timeout=10)
            if model.status_code == 200:
                self.follow_rollout(model.json().get("candidate"))
            if model.status_code != 200 or model.json()["version"] == self.version:
                return  # 503: nothing promoted yet
            answer = httpx.post(f"{self.url}/predict", json=encounter | {"request_id": request_id}, timeout=30)
        except httpx.HTTPError:
            return  # a worker busy loading a version on a loaded machine: asked again in a second
        if answer.status_code != 200:
            self.say(f"POST {self.url}/predict ({about}) → {answer.status_code} {answer.text}")
            return
        body = answer.json()
        if not self.answers:
            self.say(f"first prediction: POST {self.url}/predict  ({about})\n      → 200 {answer.text}")
        else:
            before = self.answers[-1]
            self.say(f"the service now answers with v{body['model_version']} (was v{before['model_version']}), without "
                     f"a restart: probability {before['probability']:.3f} → {body['probability']:.3f}, risk band "
                     f"{before['risk_band']} → {body['risk_band']} for the same encounter (request {request_id})")  # fmt: skip
        self.answers.append(body)

    def follow_rollout(self, candidate: dict | None) -> None:
        """Say where a candidate's rollout stands when it moves, and send real encounters while one is in shadow or
        canary, as a hospital's traffic would: rollout_sensor judges the candidate on them from the prediction log."""
        import httpx

        seen = self.candidate
        self.candidate = candidate
        if candidate is None:
            return
        if seen is None or (seen["version"], seen["stage"], seen.get("share")) != (candidate["version"], candidate["stage"], candidate.get("share")):
            where = "in shadow (scored beside production, never answering)" if candidate["stage"] == "shadow" else (
                f"canary, answering {float(candidate.get('share') or 0):.0%} of requests")  # fmt: skip
            self.say(f"v{candidate['version']} is {where}; rollout_sensor advances it on healthy live signals or rolls "
                     f"it back (`readmission rollout status`)")  # fmt: skip
        if not self.traffic:
            return
        # TRAFFIC_REQUESTS encounters a poll, the next ones each time, so the stage sees each encounter once before
        # any of them again.
        start = self.sent * TRAFFIC_REQUESTS
        self.sent += 1
        chosen = [self.traffic[(start + i) % len(self.traffic)] for i in range(min(TRAFFIC_REQUESTS, len(self.traffic)))]
        batch = [e | {"request_id": f"demo-traffic-{self.sent}-{i}"} for i, e in enumerate(chosen)]
        try:
            httpx.post(f"{self.url}/predict_batch", json={"encounters": batch}, timeout=30)
        except httpx.HTTPError:
            pass  # asked again at the next poll

    def wait_for_rollout(self, timeout: float) -> None:
        """Poll until no candidate is in rollout (it reached production or was rolled back), or `timeout` seconds."""
        deadline = time.monotonic() + timeout
        self.poll()
        while self.candidate is not None and time.monotonic() < deadline:
            time.sleep(1)
            self.poll()

    def wait_for(self, version: str, timeout: float) -> None:
        """Return once the service answers with `version`; TimeoutError naming its log after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while self.version != version:
            if time.monotonic() > deadline:
                raise TimeoutError(f"after {timeout:.0f} s the service does not answer with v{version}; see {self.log_path}")
            time.sleep(1)
            self.poll()


def rollout_traffic(settings, rows: int = 1_000) -> list[dict]:
    """Real encounters, as requests, for the demo to send while a candidate rolls out: up to `rows` of the first stored
    batch whose patients are on the test side of the split, whom no version trains on, as a hospital's new patients
    would be (the candidate is judged on how it scores them beside production; on encounters both versions trained
    on, their probabilities differ more than they would on anyone else's)."""
    import polars as pl

    from readmission_platform.lib.encounter import from_clean
    from readmission_platform.lib.splitting import SPLIT, assign_split
    from readmission_platform.lib.warehouse import open_warehouse

    with open_warehouse(settings.warehouse_url) as store:
        if "clean_batches" not in store.tables():
            return []
        first = store.query("SELECT * FROM clean_batches WHERE batch_id = (SELECT min(batch_id) FROM clean_batches) ORDER BY encounter_id")
    unseen = assign_split(first).filter(pl.col(SPLIT) == "test").drop(SPLIT).head(rows)
    return [from_clean(row) for row in unseen.iter_rows(named=True)]


def training_covers(instance: dg.DagsterInstance, batch_id: str) -> bool:
    """The newest candidate was trained on `batch_id` (and every batch before it)."""
    event = instance.get_latest_materialization_event(dg.AssetKey("trained_model"))
    if event is None or event.asset_materialization is None:
        return False
    batch_ids = event.asset_materialization.metadata.get("batch_ids")
    return batch_id in str(getattr(batch_ids, "value", batch_ids) or "").split(",")


def production_version(settings) -> str | None:
    """The version behind the alias `production`, or None before the first promotion."""
    from readmission_platform.lib.registry import ModelRegistry

    production = ModelRegistry(settings.mlflow_tracking_uri, settings.mlflow_artifact_location).production()
    return str(production.version) if production else None


def first_model(settings, landed: list, watcher: RunWatcher, service: FollowedService, progress: Progress,
                timeout: float, log_path: Path) -> None:  # fmt: skip
    """Wait for the ingestion of the first batch (`landed`, empty when every batch had landed before) and for the
    retrain after it, until the service answers with the version that retrain promoted (before the run has built its
    Bento) or the retrain ends without promoting."""
    if landed:
        batch = landed[0]
        watcher.wait({run_tags.SHA: content_hash(batch.path.read_bytes())}, f"ingestion of {batch.path.name}", timeout, log_path)
    service.encounter = sample_encounter(settings)
    service.traffic = rollout_traffic(settings)
    if landed:
        found = watcher.wait({run_tags.NEWEST_BATCH: batch_id_for(batch.path)}, f"the retrain after {batch.path.name}",
                             timeout, log_path, appear_within=RETRAIN_APPEARS_WITHIN, until=lambda: service.version is not None)  # fmt: skip
        if found is None:
            progress("  retrain_sensor started no retrain (see its skip reason under Automation in the UI)")
    if service.version is None and (version := production_version(settings)) is not None:
        service.wait_for(version, timeout)
    if service.version is None:
        progress("nothing is promoted yet: the service answers 503 until a retrain promotes a version")


def land_rest(land_one: Callable[[], list], watcher: RunWatcher, progress: Progress, timeout: float, log_path: Path) -> str | None:
    """Land the remaining batches one after another, each once landing_sensor has made a run of the one before, and
    wait for their ingestion; retrain_sensor retrains on what has arrived, one retrain at a time, so the batches that
    land during a retrain share the next one. Then wait until a retrain has covered the last batch. The id of the last
    batch landed, or None when none was left."""
    last, ingests = None, []
    while landed := land_one():
        batch = landed[0]
        progress.landed += 1
        last = batch_id_for(batch.path)
        progress(f"landed {batch.path.name} ({batch.rows:,} encounters)")
        ingest = dg.RunsFilter(tags={run_tags.SHA: content_hash(batch.path.read_bytes())})
        ingests.append((ingest, batch.path.name))
        watcher.wait(ingest, f"ingestion of {batch.path.name}", timeout, log_path,
                     until=lambda ingest=ingest: bool(watcher.instance.get_runs(ingest, limit=1)))  # fmt: skip
    for ingest, name in ingests:
        watcher.wait(ingest, f"ingestion of {name}", timeout, log_path)
    if last is None:
        return None
    retrains = dg.RunsFilter(job_name=retrain_job.name)
    counted, idle_since = -1, time.monotonic()
    while True:
        runs = watcher.wait(retrains, "the retrains", timeout, log_path, appear_within=RETRAIN_APPEARS_WITHIN) or []
        if training_covers(watcher.instance, last):
            return last
        # The retrain that takes in the last batches is requested at the sensor's next tick after the one before ended.
        if len(runs) != counted:
            counted, idle_since = len(runs), time.monotonic()
        elif time.monotonic() - idle_since > RETRAIN_APPEARS_WITHIN:
            progress("  retrain_sensor started no retrain on the last batch (see its skip reason under Automation in the UI)")
            return last
        watcher.tick()
        time.sleep(1)


def wait_for_live_performance(path: Path, instance: dg.DagsterInstance, say, timeout: float, log_path: Path) -> None:
    """Wait for the ingestion of a landed file of outcomes and for the measurement of live performance after it."""

    watcher = RunWatcher(instance, say)
    watcher.wait({run_tags.SHA: content_hash(path.read_bytes())}, f"ingestion of {path.name}", timeout, log_path)
    found = watcher.wait({run_tags.AFTER_OUTCOMES: batch_id_for(path)}, f"live performance after {path.name}", timeout, log_path,
                         appear_within=120)  # fmt: skip
    if found is None:
        say("  live_performance_sensor started no measurement (see its ticks under Automation in the UI)")


def serve_last_batch(url: str, settings, say) -> list[str] | None:
    """Send the running service every encounter of the last batch in one /predict_batch, each under its encounter_id
    as the request_id, as a hospital system would; the request ids, or None if it failed."""
    import httpx

    from readmission_platform.lib.encounter import from_clean
    from readmission_platform.lib.warehouse import open_warehouse

    with open_warehouse(settings.warehouse_url) as store:
        newest = store.query("SELECT max(batch_id) AS b FROM clean_batches")["b"][0]
        rows = store.query("SELECT * FROM clean_batches WHERE batch_id = $1 ORDER BY encounter_id", [newest])
    encounters = [from_clean(row) | {"request_id": str(row["encounter_id"])} for row in rows.iter_rows(named=True)]
    try:
        info = httpx.get(f"{url}/model", timeout=30).json()
        batch = httpx.post(f"{url}/predict_batch", json={"encounters": encounters}, timeout=300)
    except httpx.HTTPError as error:
        say(f"serving failed: {error}")
        return None
    say(f"POST {url}/predict_batch  (all {len(encounters):,} encounters of {newest}, each under its encounter_id as "
        f"the request_id) → {batch.status_code}, by {info['name']} v{info['version']} ({info['family']}, threshold "
        f"{info['threshold']:.3f})")  # fmt: skip
    return [e["request_id"] for e in encounters] if batch.status_code == 200 else None


def show_returning_patient(url: str, settings, watcher: RunWatcher, say, timeout: float, log_path: Path) -> None:
    """Once patient_history has stored the loaded patients' history, ask for the patient with the most stored
    encounters as if they came back with their latest one, with their identifier and without it, and say what the
    service answered (or why it could not)."""
    import httpx

    from readmission_platform.lib.encounter import PATIENT_ID, from_clean
    from readmission_platform.lib.warehouse import open_warehouse

    runs = watcher.wait(dg.RunsFilter(job_name="update_patient_history"), "update_patient_history", timeout, log_path,
                        appear_within=HISTORY_APPEARS_WITHIN)  # fmt: skip
    if not runs or runs[0].status != dg.DagsterRunStatus.SUCCESS:
        say("patient_history was not stored (see update_patient_history in the UI; a daemon started without "
            "READMISSION_PATIENT_KEY keeps no history): no history to serve")
        return
    with open_warehouse(settings.warehouse_url) as store:
        most = store.query(
            "SELECT patient_nbr, count(*) AS encounters FROM clean_batches GROUP BY patient_nbr "
            "ORDER BY encounters DESC, patient_nbr LIMIT 1"
        ).row(0, named=True)
        latest = store.query(
            "SELECT * FROM clean_batches WHERE patient_nbr = $1 ORDER BY encounter_id DESC LIMIT 1", [most["patient_nbr"]]
        ).row(0, named=True)
    encounter = from_clean(latest)
    named = encounter | {PATIENT_ID: str(most["patient_nbr"]), "request_id": "demo-history-patient"}
    deadline = time.monotonic() + timeout
    while True:  # the service reads a new history version within RELOAD_SECONDS of its writing
        try:
            answer = httpx.post(f"{url}/predict", json=named, timeout=30)
            unnamed = httpx.post(f"{url}/predict", json=encounter | {"request_id": "demo-history-none"}, timeout=30)
        except httpx.HTTPError as error:
            say(f"serving failed: {error}")
            return
        if answer.status_code != 200 or unnamed.status_code != 200:
            say(f"POST {url}/predict → {answer.status_code} {answer.text}; without patient_id → {unnamed.status_code}")
            return
        if answer.json()["history_used"] or time.monotonic() > deadline:
            break
        time.sleep(1)
    used, first = answer.json(), unnamed.json()
    say(f"a returning patient: POST {url}/predict with the patient_id of the patient with the most stored encounters "
        f"({most['encounters']}), their latest encounter sent again → history used: {'yes' if used['history_used'] else 'no'}, "
        f"probability {used['probability']:.3f}; without the patient_id (a first encounter's history) "
        f"{first['probability']:.3f}. The service hashes the identifier with READMISSION_PATIENT_KEY at once; the "
        f"prediction log keeps the hash, never the identifier")  # fmt: skip


def count_logged(settings, request_ids: list[str], say) -> bool:
    """Print how many of the demo's requests the prediction log holds (read once the service has stopped and flushed
    it); False if none of `request_ids` is there."""
    from readmission_platform.lib.predictions import read_predictions

    logged = read_predictions(settings.prediction_log_url, ["request_id"])["request_id"]
    served = logged.filter(logged.is_in(request_ids)).n_unique()
    say(f"logged in {settings.prediction_log_url}: {int((logged == 'demo-1').sum())} row(s) for request demo-1; "
        f"{served:,} of the last batch's {len(request_ids):,} encounters")  # fmt: skip
    return served > 0


def landed_requests(folder: Path, say) -> pl.Series:
    """The request ids of the outcome files in `folder`, read by the column's name as `outcomes` reads them. A file
    `outcomes` would refuse is named and left out: it stores nothing, so its outcomes are still due."""
    import polars as pl

    from readmission_platform.lib.landing import landed_files
    from readmission_platform.lib.outcomes import OutcomeFileError, read_outcomes

    ids = [pl.Series("request_id", [], dtype=pl.String)]
    for path in landed_files(folder):
        try:
            ids.append(read_outcomes(path.read_bytes(), str(path))["request_id"])
        except OutcomeFileError as error:
            say(f"warning: {error}; its run of `outcomes` fails and stores nothing, so its outcomes count as not landed")
    return pl.concat(ids)


def land_served_outcomes(settings, say) -> Path | None:
    """Land, as the hospital system would 30 days on, the outcomes of the encounters served under their
    encounter_id that have none yet (landed or stored), taken from the data set's labels; the file, or None."""
    import polars as pl

    from readmission_platform.lib.outcomes import OUTCOMES, land_outcomes, outcomes_csv
    from readmission_platform.lib.predictions import read_predictions, sqlite_path
    from readmission_platform.lib.reporting import masked
    from readmission_platform.lib.warehouse import open_warehouse

    with open_warehouse(settings.warehouse_url) as store:
        stored = store.query(f"SELECT request_id FROM {OUTCOMES}")
        labels = store.query("SELECT encounter_id, readmitted_30d FROM clean_batches")
    if not labels.width:  # the warehouse reads a table that does not exist as no columns
        raise RuntimeError(
            f"nothing has been ingested yet (no clean_batches in {store.describe()}), so there are no outcomes to land: "
            "run `readmission demo`, or land batches (`readmission land`) with the daemon running (`readmission ui`)"
        )
    if (log := sqlite_path(settings.prediction_log_url)) is not None and not log.exists():
        # The log's reader takes a file not made yet as no predictions; here it is more likely a setting that names
        # the wrong file than a service that never answered.
        given = settings.variables.get("prediction_log_url")
        raise RuntimeError(
            f"no prediction log at {log} ({f'from {given}' if given else 'the default'}): nothing has been served with "
            "this setting yet, so there are no outcomes to land"
        )
    served = (
        read_predictions(settings.prediction_log_url, ["request_id"])
        .filter(pl.col("request_id").str.contains(r"^[1-9][0-9]{0,17}$"))
        .select(pl.col("request_id").cast(pl.Int64).alias("encounter_id"))
        .unique()
    )
    if served.is_empty():
        say(f"the prediction log at {masked(settings.prediction_log_url)} holds no prediction served under an "
            "encounter_id (as its request_id): there are no outcomes to land")  # fmt: skip
        return None
    folder = settings.landing_dir / "outcomes"
    landed = landed_requests(folder, say)
    known = pl.concat([landed, *([stored["request_id"]] if stored.width else [])])
    due = labels.join(served, on="encounter_id").filter(
        ~pl.col("encounter_id").is_in(known.cast(pl.Int64, strict=False).drop_nulls().implode())
    )
    if due.is_empty():
        say(f"every served encounter's outcome has landed already ({served.height:,} served under their encounter_id)")
        return None
    path = land_outcomes(outcomes_csv(due.sort("encounter_id"), datetime.now(UTC)), folder)
    say(f"landed {path.name}: outcomes of {due.height:,} served encounters ({int(due['readmitted_30d'].sum()):,} readmitted within 30 days)")
    return path


def run_demo(settings, source: bytes, instance: dg.DagsterInstance, progress: Progress, timeout: float, port: int,
             log_path: Path) -> bool:  # fmt: skip
    """Land the batches and serve from the first promoted version on while the rest land and retrain; then serve the
    last batch, land the outcomes of what was served and wait for live performance. False if serving failed."""
    from readmission_platform.lib.landing import land
    from readmission_platform.serving.server import running_server

    def land_one() -> list:
        return land(source, settings.landing_dir, 1)

    progress.stage = "first model"
    # Landed before the service starts, so that its ingestion and the service's start-up overlap.
    if landed := land_one():
        progress.landed += 1
        progress(f"landed {landed[0].path.name} ({landed[0].rows:,} encounters)")
    serve_log = settings.home / "logs" / "bentoml-serve-demo.log"
    progress(f"starting `bentoml serve .` (the repository's service) on port {port}; it follows the alias "
             f"`production`, checked every {RELOAD_SECONDS} s; its log: {serve_log}")  # fmt: skip
    reload = {"READMISSION_RELOAD_SECONDS": str(RELOAD_SECONDS)}
    with running_server(settings, bento=None, port=port, env=reload, ready_within=timeout, log_path=serve_log,
                        wait_for="/livez") as url:  # fmt: skip
        service = FollowedService(url, serve_log, progress)
        watcher = RunWatcher(instance, progress, tick=service.poll)
        progress(f"the service is up on {url}; it answers 503 until a version is promoted")
        first_model(settings, landed, watcher, service, progress, timeout, log_path)
        progress.stage = "more batches"
        if land_rest(land_one, watcher, progress, timeout, log_path) is None and not landed:
            progress(f"every batch of the source is already in {settings.landing_dir}")
        progress.stage = "rollout"
        service.wait_for_rollout(timeout)
        if (version := production_version(settings)) is None:
            progress("no version was promoted: nothing to serve (see promotion_decision in the UI)")
            return False
        service.wait_for(version, timeout)
        progress.stage = "serving"
        request_ids = serve_last_batch(url, settings, progress)
        progress.stage = "history"
        # Said, not fatal: a daemon another command started without the key keeps no history, and serving still works.
        show_returning_patient(url, settings, watcher, progress, timeout, log_path)
    progress("stopped the service; its worker wrote every prediction to the log before it exited")
    if request_ids is None or not count_logged(settings, request_ids, progress):
        return False
    progress.stage = "outcomes"
    progress("the outcomes of what was served come back; outcome_sensor ingests them (outcomes) and "
             "live_performance_sensor measures every version on them (live_performance):")  # fmt: skip
    if (path := land_served_outcomes(settings, progress)) is not None:
        wait_for_live_performance(path, instance, progress, timeout, log_path)
    return True
