"""The production profile's figures, each beside its baseline measured in the same run.

- ingestion of the seven batches of the full data set on a PostgreSQL warehouse through the real daemon, run launcher
  and code server, with one run and one `warehouse` slot at a time against the profile's four, as a ratio;
- `/predict_batch` throughput of one service replica against two, on a model promoted through the tracking server, and
  the CPU the replicas spent per encounter, from which the arithmetic for 1,000,000 encounters/s follows.

Needs the PostgreSQL server at READMISSION_TEST_PG_URL (default postgresql://postgres@127.0.0.1:5432/postgres).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import secrets
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlsplit

import dagster as dg
import httpx
import psutil
import psycopg
import yaml

sys.path.insert(0, str(Path(__file__).parent))
from serving_setup import prepare  # noqa: E402

from readmission_platform.cli.demo import settled  # noqa: E402
from readmission_platform.deploy import spec  # noqa: E402
from readmission_platform.deploy.local import Profile  # noqa: E402
from readmission_platform.lib.landing import land  # noqa: E402
from readmission_platform.lib.predictions import TABLE as PREDICTIONS  # noqa: E402
from readmission_platform.lib.registry import ModelRegistry  # noqa: E402
from readmission_platform.lib.source import read_source_bytes  # noqa: E402
from readmission_platform.lib.training import model_input  # noqa: E402

ADMIN_URL = os.environ.get("READMISSION_TEST_PG_URL") or "postgresql://postgres@127.0.0.1:5432/postgres"


class Databases:
    """A fresh database per store of the profile, dropped at the end."""

    def __init__(self, label: str) -> None:
        tag = secrets.token_hex(4)
        self.urls = {name: self._make(f"bench_{label}_{name.lower().split('_')[1]}_{tag}") for name in spec.DATABASES}

    def _make(self, name: str) -> str:
        with psycopg.connect(ADMIN_URL, autocommit=True) as connection:
            connection.execute(f'CREATE DATABASE "{name}"')
        return urlsplit(ADMIN_URL)._replace(path=f"/{name}").geturl()

    def drop(self) -> None:
        with psycopg.connect(ADMIN_URL, autocommit=True) as connection:
            for url in self.urls.values():
                connection.execute(f'DROP DATABASE IF EXISTS "{urlsplit(url).path[1:]}" WITH (FORCE)')


def ingest_seconds(root: Path, concurrency: int) -> tuple[float, int, int]:
    """Seconds from the seven batches landing to the last one ingested, the most runs seen in progress at once, and
    the encounters landed."""
    databases = Databases(f"c{concurrency}")
    profile = Profile(root / f"concurrency-{concurrency}", databases.urls, replicas=0, concurrency=concurrency)
    try:
        profile.start_backends()
        # Retraining would compete for the same cores; only ingestion is measured.
        profile.dagster("sensor", "stop", "retrain_sensor")
        client = root / f"client-{concurrency}"
        client.mkdir()
        (client / "dagster.yaml").write_text(yaml.safe_dump(spec.instance_config(concurrency=concurrency)))
        os.environ |= {"DAGSTER_HOME": str(client), spec.INSTANCE_SECRET: databases.urls[spec.INSTANCE_SECRET]}
        with dg.DagsterInstance.get() as instance:
            started = time.monotonic()
            landed = land(read_source_bytes(None), profile.landing, None)
            while True:
                runs = instance.get_runs(dg.RunsFilter(job_name="ingest_batch"))
                if len(runs) >= len(landed) and settled(runs):
                    break
                time.sleep(0.5)
            elapsed = time.monotonic() - started
            failed = [r.run_id for r in runs if r.status != dg.DagsterRunStatus.SUCCESS]
            if failed:
                raise RuntimeError(f"ingestion runs failed: {failed}; see {profile.root}")
            records = instance.get_run_records(dg.RunsFilter(job_name="ingest_batch"))
            edges = sorted([(r.start_time, 1) for r in records] + [(r.end_time, -1) for r in records])
            most = now = 0
            for _, step in edges:
                now += step
                most = max(most, now)
        return elapsed, most, sum(batch.rows for batch in landed)
    finally:
        profile.stop()
        databases.drop()


def _client(url: str, body: bytes, seconds: float, out) -> None:
    """Post `body` to `url`/predict_batch until `seconds` pass; put (answers, encounters answered)."""
    answered = requests = 0
    deadline = time.monotonic() + seconds
    with httpx.Client(timeout=120) as client:
        while time.monotonic() < deadline:
            response = client.post(f"{url}/predict_batch", content=body, headers={"Content-Type": "application/json"})
            response.raise_for_status()
            answered += len(response.json()["predictions"])
            requests += 1
    out.put((requests, answered))


def tree_cpu(pid: int) -> float:
    """CPU seconds a process and its living children have used."""
    total = 0.0
    for process in [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]:
        try:
            times = process.cpu_times()
            total += times.user + times.system
        except psutil.NoSuchProcess:
            continue
    return total


def throughput(profile: Profile, replicas: list[str], body: bytes, encounters: int, seconds: float, clients: int) -> dict:
    """Encounters answered per second by `clients` client processes per replica, and the replicas' CPU per encounter."""
    queue = multiprocessing.Queue()
    urls = [profile.running[name].url for name in replicas]
    pids = [profile.running[name].process.pid for name in replicas]
    cpu_before = sum(tree_cpu(pid) for pid in pids)
    processes = [multiprocessing.Process(target=_client, args=(url, body, seconds, queue)) for url in urls for _ in range(clients)]
    started = time.monotonic()
    for process in processes:
        process.start()
    results = [queue.get() for _ in processes]
    for process in processes:
        process.join()
    elapsed = time.monotonic() - started
    cpu = sum(tree_cpu(pid) for pid in pids) - cpu_before
    answered = sum(a for _, a in results)
    return {"encounters_per_second": answered / elapsed, "requests": sum(r for r, _ in results),
            "cpu_seconds_per_encounter": cpu / answered, "batch": encounters}  # fmt: skip


def prediction_log_size(url: str) -> dict:
    """Rows in the prediction log and the bytes its table takes with its indexes, as PostgreSQL counts them."""
    with psycopg.connect(url) as connection:
        rows = connection.execute(f"SELECT count(*) FROM {PREDICTIONS}").fetchone()[0]
        size = connection.execute(f"SELECT pg_total_relation_size('{PREDICTIONS}')").fetchone()[0]
    return {"rows": rows, "bytes": size}


def serving(root: Path, seconds: float, batch: int, clients: int) -> dict:
    databases = Databases("serve")
    profile = Profile(root / "serving", databases.urls, replicas=2, reload_seconds=2)
    try:
        setup_home = root / "setup"
        setup = prepare(setup_home, encounters=batch)
        profile.start_backends()
        registry = ModelRegistry(profile.running["mlflow"].url, None)
        candidate = setup.candidate
        run_id = registry.log_candidate(
            candidate.model, params=candidate.params, metrics={f"validation_{k}": v for k, v in candidate.validation.items()},
            tags={"batch_ids": "all"}, artifacts=None, input_example=model_input(setup.rows.head(5)), run_name="bench-deploy",
        )  # fmt: skip
        version = registry.register(run_id, threshold=candidate.threshold, tags={"family": candidate.family, "batch_ids": "all"})
        registry.promote(version, reason="deploy benchmark")
        for replica in (1, 2):
            profile.start_service(replica, wait_for="/readyz")
        body = json.dumps({"encounters": setup.encounters}).encode()
        one = throughput(profile, ["service-1"], body, batch, seconds, clients)
        two = throughput(profile, ["service-1", "service-2"], body, batch, seconds, clients)
        profile.stop()  # the replicas flush their prediction logs on SIGTERM
        return {"one": one, "two": two, "log": prediction_log_size(databases.urls["READMISSION_PREDICTION_LOG_URL"])}
    finally:
        profile.stop()
        databases.drop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=30.0, help="load per throughput measurement (default 30)")
    parser.add_argument("--batch", type=int, default=2_000, help="encounters per /predict_batch request (default 2,000)")
    parser.add_argument("--clients", type=int, default=2, help="client processes per replica (default 2)")
    parser.add_argument("--only", choices=["ingestion", "serving"], help="one of the two figures (default both)")
    args = parser.parse_args()
    cores = psutil.cpu_count()
    print(f"{cores} cores, load average {os.getloadavg()[0]:.1f} at the start", flush=True)
    with tempfile.TemporaryDirectory(prefix="bench-deploy-") as folder:
        root = Path(folder)
        if args.only != "serving":
            serial, serial_most, encounters = ingest_seconds(root, 1)
            side, side_most, _ = ingest_seconds(root, spec.WAREHOUSE_CONCURRENCY)
            print(f"\ningestion of the 7 batches ({encounters:,} encounters) on PostgreSQL, through the daemon and the run launcher:")
            print(f"  concurrency 1: {serial:7.1f} s (at most {serial_most} run at once)")
            print(f"  concurrency {spec.WAREHOUSE_CONCURRENCY}: {side:7.1f} s (at most {side_most} runs at once)")
            print(f"  ratio (1 / {spec.WAREHOUSE_CONCURRENCY}): {serial / side:.2f}x")
            print(f"  load average {os.getloadavg()[0]:.1f} at the end", flush=True)
        if args.only == "ingestion":
            return
        figures = serving(root, args.seconds, args.batch, args.clients)
    one, two = figures["one"], figures["two"]
    print(f"\n/predict_batch of {args.batch:,} encounters, {args.clients} client processes per replica, {args.seconds:.0f} s each:")
    for label, figure in (("one replica", one), ("two replicas", two)):
        print(f"  {label:12}: {figure['encounters_per_second']:9,.0f} encounters/s over {figure['requests']} requests, "
              f"{figure['cpu_seconds_per_encounter'] * 1e6:.1f} µs of replica CPU per encounter")  # fmt: skip
    print(f"  ratio (two / one): {two['encounters_per_second'] / one['encounters_per_second']:.2f}x")
    cost = min(one["cpu_seconds_per_encounter"], two["cpu_seconds_per_encounter"])
    per_core = 1 / cost
    cores_needed = 1_000_000 / per_core
    pods = cores_needed / float(spec.SERVICE_RESOURCES["limits"]["cpu"])
    print("\n1,000,000 encounters/s from the measured per-core cost:")
    print(f"  one core serves 1 / {cost * 1e6:.1f} µs = {per_core:,.0f} encounters/s")
    print(f"  1,000,000 / {per_core:,.0f} = {cores_needed:,.0f} cores of replicas, at 2 cores a pod (the Deployment's limit) "
          f"{pods:,.0f} pods; at the autoscaler's 70 % target {pods / 0.7:,.0f} pods")  # fmt: skip
    log = figures["log"]
    if not log["rows"]:
        raise RuntimeError("the replicas logged no prediction; see the service logs")
    per_row = log["bytes"] / log["rows"]
    print(f"  the prediction log: {log['rows']:,} rows took {log['bytes'] / 1e6:,.1f} MB with its indexes, "
          f"{per_row:,.0f} bytes a row; 1,000,000 rows/s is {per_row:,.0f} MB/s into PostgreSQL before WAL, "
          f"{per_row * 86_400 / 1e6:,.1f} TB a day")  # fmt: skip


if __name__ == "__main__":
    main()
