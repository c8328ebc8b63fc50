"""`make loadtest`: a bounded headless locust load on `bentoml serve` over loopback, one worker, prediction log on.

Measures the service as shipped (the fast single-encounter path) and, in the same run, the same service with
READMISSION_FAST_PATH=0, which scores each request with the pipeline's own predict_proba on a one-row frame: the
way a straightforward service would. Reports requests/s, p50/p95/p99 latency and failures, and checks that the
prediction log holds a row for every answered request. Then the ceiling: a trivial BentoML service that answers a
constant on the same route, with the same request model and server settings (`ceiling/service.py`), under the same
load; the service as shipped should keep at least 80 % of its throughput with at most 1.5× its p99. Beside it, the
same constant answered through BentoML's typed API (`@bentoml.api`), the plainest way to write such a service. The
service as shipped and the ceilings take turns for `--rounds` rounds (the pipeline only in the first): on a shared
machine a ceiling moves by more than half between runs minutes apart, so each ratio is a round's and their medians
are judged.

`--rollout` measures instead, side by side, the service as shipped with production alone and with a candidate in
shadow (a second version of the same model, scored beside production on every request and logged): the targets are
at least two thirds of production alone's throughput, a p99 at most 1.5× its p99, and no failures.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from serving_setup import prepare, wait_for_candidate  # noqa: E402

from readmission_platform.serving.prediction_log import count_predictions  # noqa: E402
from readmission_platform.serving.server import free_port, running_server, stop, wait_until_answering  # noqa: E402

HERE = Path(__file__).parent
RESULTS = HERE / "results" / "loadtest.json"
TARGET_RPS, TARGET_P99_MS = 500.0, 50.0
VARIANTS = {"fast path (as shipped)": "1", "pipeline per request (baseline)": "0"}
ROLLOUT_VARIANTS = {"production alone": False, "with a shadow": True}
MIN_SHADOW_THROUGHPUT, MAX_SHADOW_P99 = 2 / 3, 1.5
CEILING = "constant answer (ceiling)"
CEILINGS = {CEILING: "service:Ceiling", "constant, BentoML's typed API": "service:TypedCeiling"}
MIN_CEILING_THROUGHPUT, MAX_CEILING_P99 = 0.8, 1.5


def locust(url: str, encounters: Path, users: int, seconds: int, prefix: Path) -> dict:
    command = [
        str(Path(sys.executable).with_name("locust")), "-f", str(HERE / "locustfile.py"), "--headless",
        "--users", str(users), "--spawn-rate", str(users), "--run-time", f"{seconds}s", "--host", url,
        "--csv", str(prefix), "--only-summary", "--loglevel", "WARNING",
    ]  # fmt: skip
    times = Path(f"{prefix}_times.json")
    env = {**os.environ, "READMISSION_LOADTEST_ENCOUNTERS": str(encounters), "READMISSION_LOADTEST_TIMES": str(times)}
    subprocess.run(command, env=env, check=False, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    with open(f"{prefix}_stats.csv", newline="") as file:
        total = next(row for row in csv.DictReader(file) if row["Name"] == "Aggregated")
    # Percentiles of the times as measured (locustfile.py), not of locust's whole milliseconds.
    p50, p95, p99 = np.percentile(json.loads(times.read_text()), [50, 95, 99])
    return {
        "requests": int(total["Request Count"]),
        "failures": int(total["Failure Count"]),
        "requests_per_s": float(total["Requests/s"]),
        "p50_ms": float(p50),
        "p95_ms": float(p95),
        "p99_ms": float(p99),
    }


def measure(setup, encounters: Path, fast: str, users: int, seconds: int, folder: Path, shadow: bool = False) -> dict:
    label = f"{fast}_shadow" if shadow else fast
    env = {
        "READMISSION_FAST_PATH": fast,
        "READMISSION_SERVE_WORKERS": "1",
        "READMISSION_PREDICTION_LOG_URL": f"sqlite:///{folder / f'predictions_{label}.sqlite'}",
    }
    log_url = env["READMISSION_PREDICTION_LOG_URL"]
    version = setup.set_shadow(shadow)
    with running_server(setup.settings, bento=None, env=env) as url:
        wait_for_candidate(url, version)
        for body in json.loads(encounters.read_text())[:200]:  # warm up: first calls, caches, connections
            httpx.post(f"{url}/predict", json=body, timeout=30).raise_for_status()
        result = locust(url, encounters, users, seconds, folder / f"locust_{label}")
        metrics = httpx.get(f"{url}/metrics").text.splitlines()
    # The service's own count of predictions answered since it started, warm-up included, against the log's rows
    # once the server has stopped (its workers flush the log on the way out).
    result["answered"] = int(sum(float(line.split()[-1]) for line in metrics if line.startswith("readmission_predictions_total")))
    result["logged_rows"] = count_predictions(log_url)
    result["log_dropped"] = sum(float(line.split()[-1]) for line in metrics if line.startswith("readmission_prediction_log_dropped_total"))
    return result


def measure_ceiling(service: str, encounters: Path, users: int, seconds: int, folder: Path) -> dict:
    """The same load against `service` of `ceiling/service.py` under `bentoml serve`, warmed up the same way."""
    port, log_path = free_port(), folder / f"bentoml-serve-{service}.log"
    url = f"http://127.0.0.1:{port}"
    command = [str(Path(sys.executable).with_name("bentoml")), "serve", service, "--host", "127.0.0.1", "--port", str(port)]
    env = {**os.environ, "BENTOML_HOME": str(folder / "bentoml-ceiling")}
    with open(log_path, "wb") as output:
        process = subprocess.Popen(command, env=env, cwd=HERE / "ceiling", stdout=output, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            wait_until_answering(process, f"{url}/readyz", "the ceiling's bentoml serve", 120, log_path)
            for body in json.loads(encounters.read_text())[:200]:
                httpx.post(f"{url}/predict", json=body, timeout=30).raise_for_status()
            return locust(url, encounters, users, seconds, folder / f"locust_{service}")
        finally:
            stop(process)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=8, help="concurrent clients (default 8)")
    parser.add_argument("--seconds", type=int, default=30, help="length of each load (default 30)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="rounds of the service as shipped and the ceilings taking turns (default 3); the ratios "
                             "to the ceiling are each round's, and their medians are judged")  # fmt: skip
    parser.add_argument("--skip-baseline", action="store_true", help="only the service as shipped")
    parser.add_argument("--rollout", action="store_true", help="production alone against production with a shadow")
    args = parser.parse_args(argv)
    if args.rollout:
        return rollout(args.users, args.seconds)
    shipped_name, baseline_name = list(VARIANTS)
    rounds: list[dict[str, dict]] = []
    with tempfile.TemporaryDirectory(prefix="readmission_loadtest_") as folder:
        print("training a model on the full data set and promoting it in a scratch registry …", flush=True)
        setup = prepare(Path(folder) / "home", encounters=2_000)
        encounters = Path(folder) / "encounters.json"
        encounters.write_text(json.dumps(setup.encounters))
        for k in range(1, args.rounds + 1):
            print(f"round {k} of {args.rounds}, {args.users} clients for {args.seconds} s against one worker each:", flush=True)
            found, scratch = {}, Path(folder) / f"round-{k}"  # a prediction log of the round's own
            scratch.mkdir()
            for name, fast in VARIANTS.items():
                if fast == "0" and (args.skip_baseline or k > 1):  # the baseline is far off: once is enough
                    continue
                print(f"  {name} …", flush=True)
                found[name] = measure(setup, encounters, fast, args.users, args.seconds, scratch)
            for name, service in CEILINGS.items() if not args.skip_baseline else ():
                print(f"  {name} …", flush=True)
                found[name] = measure_ceiling(service, encounters, args.users, args.seconds, scratch)
            rounds.append(found)
    for k, found in enumerate(rounds, start=1):
        print(f"\nround {k}{'':26}{'req/s':>8}{'p50 ms':>9}{'p95 ms':>9}{'p99 ms':>9}{'failures':>10}{'logged':>9}")
        for name, r in found.items():
            print(f"{name:34}{r['requests_per_s']:8.0f}{r['p50_ms']:9.1f}{r['p95_ms']:9.1f}{r['p99_ms']:9.1f}"
                  f"{r['failures']:>10}{r.get('logged_rows', '—'):>9}")  # fmt: skip
    shipped = [found[shipped_name] for found in rounds]
    baseline = rounds[0].get(baseline_name)
    if baseline:
        print(f"\nthroughput ratio fast / baseline: {shipped[0]['requests_per_s'] / baseline['requests_per_s']:.1f}×")
        for name in CEILINGS:
            throughput = [r[shipped_name]["requests_per_s"] / r[name]["requests_per_s"] for r in rounds]
            p99 = [r[shipped_name]["p99_ms"] / r[name]["p99_ms"] for r in rounds]
            each = f"(rounds: {', '.join(f'{t:.2f}×' for t in throughput)}; p99 {', '.join(f'{q:.2f}×' for q in p99)})"
            t, q = statistics.median(throughput), statistics.median(p99)
            if name == CEILING:
                within = t >= MIN_CEILING_THROUGHPUT and q <= MAX_CEILING_P99
                print(f"fast / ceiling, medians: throughput {t:.2f}× (≥ {MIN_CEILING_THROUGHPUT}), p99 {q:.2f}× "
                      f"(≤ {MAX_CEILING_P99}): {'met' if within else 'NOT met'} {each}")  # fmt: skip
            else:
                print(f"fast / {name}, medians: throughput {t:.2f}×, p99 {q:.2f}× {each}")
    met = all(r["requests_per_s"] >= TARGET_RPS and r["p99_ms"] <= TARGET_P99_MS and r["failures"] == 0 for r in shipped)
    print(f"target ≥ {TARGET_RPS:.0f} req/s, p99 ≤ {TARGET_P99_MS:.0f} ms, no failures, one worker, log on, every round: "
          f"{'met' if met else 'NOT met'}")  # fmt: skip
    for k, found in enumerate(rounds, start=1):
        for name, r in found.items():
            if name not in CEILINGS:
                print(f"round {k}, {name}: {r['answered']:,} predictions answered (warm-up included), {r['logged_rows']:,} "
                      f"rows in the prediction log, {r['log_dropped']:.0f} dropped")  # fmt: skip
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps({"users": args.users, "seconds": args.seconds, "rounds": rounds}, indent=2))
    return 0


def rollout(users: int, seconds: int) -> int:
    """The service as shipped with production alone, then with a candidate in shadow, in the same run."""
    with tempfile.TemporaryDirectory(prefix="readmission_loadtest_") as folder:
        print("training a model on the full data set and promoting it in a scratch registry …", flush=True)
        setup = prepare(Path(folder) / "home", encounters=2_000)
        encounters = Path(folder) / "encounters.json"
        encounters.write_text(json.dumps(setup.encounters))
        results = {}
        for name, shadow in ROLLOUT_VARIANTS.items():
            print(f"{name}: {users} clients for {seconds} s against one worker …", flush=True)
            results[name] = measure(setup, encounters, "1", users, seconds, Path(folder), shadow=shadow)
    print(f"\n{'':20}{'req/s':>8}{'p50 ms':>9}{'p95 ms':>9}{'p99 ms':>9}{'failures':>10}{'logged':>9}")
    for name, r in results.items():
        print(f"{name:20}{r['requests_per_s']:8.0f}{r['p50_ms']:9.1f}{r['p95_ms']:9.1f}{r['p99_ms']:9.1f}"
              f"{r['failures']:>10}{r['logged_rows']:>9}")  # fmt: skip
    alone, shadowed = results["production alone"], results["with a shadow"]
    throughput = shadowed["requests_per_s"] / alone["requests_per_s"]
    p99 = shadowed["p99_ms"] / alone["p99_ms"]
    met = throughput >= MIN_SHADOW_THROUGHPUT and p99 <= MAX_SHADOW_P99 and shadowed["failures"] == alone["failures"] == 0
    print(f"with a shadow / alone: throughput {throughput:.2f}× (≥ {MIN_SHADOW_THROUGHPUT:.2f}), p99 {p99:.2f}× "
          f"(≤ {MAX_SHADOW_P99}), failures {shadowed['failures']} and {alone['failures']}: {'met' if met else 'NOT met'}")  # fmt: skip
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.with_name("loadtest_rollout.json").write_text(json.dumps({"users": users, "seconds": seconds, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
