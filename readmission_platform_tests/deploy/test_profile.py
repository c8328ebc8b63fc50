"""The production profile end to end on loopback (`make profile`): every component its own process, working directory
and home; PostgreSQL, gRPC and HTTP between them; the landing folder the only one shared."""

from __future__ import annotations

import os
import threading
import time

import dagster as dg
import httpx
import yaml
import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families

from readmission_platform.cli.demo import settled
from readmission_platform.deploy import spec
from readmission_platform.deploy.local import Profile
from readmission_platform.defs import run_tags
from readmission_platform.lib.encounter import from_clean
from readmission_platform.lib.landing import split_batches
from readmission_platform.lib.registry import ModelRegistry, decision_threshold, trained_batches
from readmission_platform.ops import pipeline

pytestmark = [pytest.mark.profile, pytest.mark.postgres]

BATCH, BATCHES = 3_000, 4
WITHIN = 1_500  # seconds for the four batches and a retrain on two cores shared with other work


def wait_for(what: str, condition, seconds: float = WITHIN):
    started = time.monotonic()
    while not (found := condition()):
        assert time.monotonic() - started < seconds, f"not within {seconds} s: {what}"
        time.sleep(1)
    return found


def most_at_once(runs: list[dg.DagsterRun], instance: dg.DagsterInstance) -> int:
    """The largest number of the runs that were in progress at the same moment (from their start and end times)."""
    records = instance.get_run_records(dg.RunsFilter(run_ids=[r.run_id for r in runs]))
    edges = sorted([(r.start_time, 1) for r in records] + [(r.end_time, -1) for r in records])
    most = now = 0
    for _, step in edges:
        now += step
        most = max(most, now)
    return most


def own_files(pid: int) -> list[str]:
    """Paths a process and its children have open or run in."""
    paths = []
    for process in [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]:
        try:
            paths.append(process.cwd())
            paths.extend(f.path for f in process.open_files())
        except psutil.NoSuchProcess:
            continue
    return paths


@pytest.fixture
def profile_databases(new_pg_database) -> dict[str, str]:
    return {name: new_pg_database(f"profile_{name.lower().split('_')[1]}") for name in spec.DATABASES}


def test_production_profile_end_to_end(tmp_path, monkeypatch, profile_databases, full_source_bytes, full_clean):
    lines = full_source_bytes.splitlines(keepends=True)
    batches = split_batches(b"".join(lines[: BATCHES * BATCH + 1]), BATCH)
    payloads = [from_clean(row) for row in full_clean.frame.tail(50).iter_rows(named=True)]
    profile = Profile(tmp_path / "profile", profile_databases, replicas=2, reload_seconds=2)
    # The test reads the instance as a client of its own, with a Dagster home of its own.
    client_home = tmp_path / "client"
    client_home.mkdir()
    (client_home / "dagster.yaml").write_text(yaml.safe_dump(spec.instance_config()))
    monkeypatch.setenv("DAGSTER_HOME", str(client_home))
    monkeypatch.setenv(spec.INSTANCE_SECRET, profile_databases[spec.INSTANCE_SECRET])
    with profile, dg.DagsterInstance.get() as instance:
        # Batches land, side by side; the landing sensor ingests them, four runs and four warehouse slots at once.
        landed_at = time.time()
        for number, data in enumerate(batches, start=1):
            hidden = profile.landing / f".batch_{number:04d}.csv.part"
            hidden.write_bytes(data)
            hidden.rename(profile.landing / f"batch_{number:04d}.csv")
        ingest = lambda: instance.get_runs(dg.RunsFilter(job_name="ingest_batch"))  # noqa: E731
        runs = wait_for("every batch ingested", lambda: (r := ingest()) and len(r) >= BATCHES and settled(r) and r)
        assert {r.tags[run_tags.PARTITION] for r in runs if r.status == dg.DagsterRunStatus.SUCCESS} == {
            f"batch_{n:04d}" for n in range(1, BATCHES + 1)
        }
        assert most_at_once(runs, instance) >= 2, "the batches were ingested one after another"
        assert instance.event_log_storage.get_concurrency_info("warehouse").slot_count == spec.WAREHOUSE_CONCURRENCY
        # The pipeline's exporter, the compose file's Prometheus target, sees it from the same storage and landing folder.
        exporter = httpx.get(f"{profile.running[spec.PIPELINE_EXPORTER.name].url}/metrics", timeout=60).text
        metrics = {s.name: s.value for f in text_string_to_metric_families(exporter) for s in f.samples if not s.labels}
        assert metrics[pipeline.BATCHES_WAITING] == 0 and metrics[pipeline.LAST_INGESTION] > landed_at, metrics

        # A retrain promotes through the tracking server; its artifacts live behind that server alone. Once the
        # version in production was trained on the last batch and no retrain is left to run, the alias moves only
        # when this test moves it.
        registry = ModelRegistry(profile.running["mlflow"].url, None)
        retrains = lambda: instance.get_runs(dg.RunsFilter(job_name="retrain"))  # noqa: E731
        last = f"batch_{BATCHES:04d}"
        production = wait_for("a version trained on every batch in production", lambda: (r := retrains()) and settled(r)
                              and (p := registry.production()) is not None and last in trained_batches(p) and p)  # fmt: skip
        assert registry.client.get_run(production.run_id).info.artifact_uri.startswith("mlflow-artifacts:")

        # Both replicas load it over HTTP, then follow a new promotion.
        services = [profile.running[f"service-{n}"].url for n in (1, 2)]
        served = lambda url: httpx.get(f"{url}/model", timeout=10).json().get("version")  # noqa: E731
        wait_for("both replicas serving it", lambda: all(served(url) == str(production.version) for url in services), 300)
        tags = {k: v for k, v in production.tags.items() if not k.startswith("promot") and k != "previous_production"}
        newer = registry.register(production.run_id, threshold=decision_threshold(production), tags=tags)
        registry.promote(newer, reason="the profile test: a new promotion both replicas must follow")
        wait_for("both replicas following it", lambda: all(served(url) == newer for url in services), 300)

        # One replica dies under load; the other answers every request.
        body = {"encounters": payloads}
        answers: dict[str, list[int]] = {url: [] for url in services}
        stop = threading.Event()

        def load(url: str) -> None:
            with httpx.Client(timeout=30) as client:
                while not stop.is_set():
                    try:
                        answers[url].append(client.post(f"{url}/predict_batch", json=body).status_code)
                    except httpx.HTTPError:
                        answers[url].append(0)
                        time.sleep(0.1)

        threads = [threading.Thread(target=load, args=(url,)) for url in services]
        for thread in threads:
            thread.start()
        time.sleep(5)
        profile.kill("service-1")
        before = len(answers[services[1]])
        time.sleep(10)
        stop.set()
        for thread in threads:
            thread.join()
        survivor = answers[services[1]]
        assert len(survivor) > before and set(survivor) == {200}, survivor
        assert answers[services[0]][-1] == 0 and 200 in answers[services[0]]

        # Nothing is read from another component's disk: each process runs in, and opens files under, its own folder.
        folders = {name: running.folder for name, running in profile.running.items()}
        assert len(set(folders.values())) == len(folders)
        homes = [r.env.get("READMISSION_HOME") for r in profile.running.values() if "READMISSION_HOME" in r.env]
        assert len(homes) == len(set(homes)) == 4  # the code location, the exporter and the two replicas, none in common
        for name, running in profile.running.items():
            if running.process.poll() is not None:
                continue
            assert psutil.Process(running.process.pid).cwd() == str(running.folder)
            others = [str(folder) for other, folder in folders.items() if other != name]
            strays = [p for p in own_files(running.process.pid) if any(p.startswith(o + os.sep) or p == o for o in others)]
            assert not strays, f"{name} has files of another component open: {strays}"
        # The registry's models are the tracking server's files; the only other copy is the one the code location
        # downloaded over HTTP into its own BentoML store (serving_bento); the replicas hold theirs in memory.
        models = list(profile.root.rglob("MLmodel"))
        assert any(folders["mlflow"] in p.parents for p in models), models
        assert all(folders["mlflow"] in p.parents or folders["code-location"] / "home" / "bentoml" in p.parents
                   for p in models), models  # fmt: skip
