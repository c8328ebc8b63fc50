"""`make loadtest`: a bounded headless locust load on `bentoml serve` over loopback, one worker, prediction log on.

Measures the service as shipped (the fast single-encounter path) and, in the same run, the same service with
READMISSION_FAST_PATH=0, which scores each request with the pipeline's own predict_proba on a one-row frame: the
way a straightforward service would. Reports requests/s, p50/p95/p99 latency and failures, and checks that the
prediction log holds a row for every answered request.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).parent))
from serving_setup import prepare  # noqa: E402

from readmission_platform.serving.prediction_log import count_predictions  # noqa: E402
from readmission_platform.serving.server import running_server  # noqa: E402

HERE = Path(__file__).parent
RESULTS = HERE / "results" / "loadtest.json"
TARGET_RPS, TARGET_P99_MS = 500.0, 50.0
VARIANTS = {"fast path (as shipped)": "1", "pipeline per request (baseline)": "0"}


def locust(url: str, encounters: Path, users: int, seconds: int, prefix: Path) -> dict:
    command = [
        str(Path(sys.executable).with_name("locust")), "-f", str(HERE / "locustfile.py"), "--headless",
        "--users", str(users), "--spawn-rate", str(users), "--run-time", f"{seconds}s", "--host", url,
        "--csv", str(prefix), "--only-summary", "--loglevel", "WARNING",
    ]  # fmt: skip
    env = {**os.environ, "READMISSION_LOADTEST_ENCOUNTERS": str(encounters)}
    subprocess.run(command, env=env, check=False, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    with open(f"{prefix}_stats.csv", newline="") as file:
        total = next(row for row in csv.DictReader(file) if row["Name"] == "Aggregated")
    return {
        "requests": int(total["Request Count"]),
        "failures": int(total["Failure Count"]),
        "requests_per_s": float(total["Requests/s"]),
        "p50_ms": float(total["50%"]),
        "p95_ms": float(total["95%"]),
        "p99_ms": float(total["99%"]),
    }


def measure(setup, encounters: Path, fast: str, users: int, seconds: int, folder: Path) -> dict:
    env = {
        "READMISSION_FAST_PATH": fast,
        "READMISSION_SERVE_WORKERS": "1",
        "READMISSION_PREDICTION_LOG_URL": f"sqlite:///{folder / f'predictions_{fast}.sqlite'}",
    }
    log_url = env["READMISSION_PREDICTION_LOG_URL"]
    with running_server(setup.settings, bento=None, env=env) as url:
        for body in json.loads(encounters.read_text())[:200]:  # warm up: first calls, caches, connections
            httpx.post(f"{url}/predict", json=body, timeout=30).raise_for_status()
        result = locust(url, encounters, users, seconds, folder / f"locust_{fast}")
        metrics = httpx.get(f"{url}/metrics").text.splitlines()
    # The service's own count of predictions answered since it started, warm-up included, against the log's rows
    # once the server has stopped (its workers flush the log on the way out).
    result["answered"] = int(sum(float(line.split()[-1]) for line in metrics if line.startswith("readmission_predictions_total")))
    result["logged_rows"] = count_predictions(log_url)
    result["log_dropped"] = sum(float(line.split()[-1]) for line in metrics if line.startswith("readmission_prediction_log_dropped_total"))
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=8, help="concurrent clients (default 8)")
    parser.add_argument("--seconds", type=int, default=30, help="length of each load (default 30)")
    parser.add_argument("--skip-baseline", action="store_true", help="only the service as shipped")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="readmission_loadtest_") as folder:
        print("training a model on the full data set and promoting it in a scratch registry …", flush=True)
        setup = prepare(Path(folder) / "home", encounters=2_000)
        encounters = Path(folder) / "encounters.json"
        encounters.write_text(json.dumps(setup.encounters))
        results = {}
        for name, fast in VARIANTS.items():
            if args.skip_baseline and fast == "0":
                continue
            print(f"{name}: {args.users} clients for {args.seconds} s against one worker …", flush=True)
            results[name] = measure(setup, encounters, fast, args.users, args.seconds, Path(folder))
    print(f"\n{'':34}{'req/s':>8}{'p50 ms':>9}{'p95 ms':>9}{'p99 ms':>9}{'failures':>10}{'logged':>9}")
    for name, r in results.items():
        print(f"{name:34}{r['requests_per_s']:8.0f}{r['p50_ms']:9.0f}{r['p95_ms']:9.0f}{r['p99_ms']:9.0f}"
              f"{r['failures']:>10}{r['logged_rows']:>9}")  # fmt: skip
    shipped = results["fast path (as shipped)"]
    baseline = results.get("pipeline per request (baseline)")
    if baseline:
        print(f"throughput ratio fast / baseline: {shipped['requests_per_s'] / baseline['requests_per_s']:.1f}×")
    met = shipped["requests_per_s"] >= TARGET_RPS and shipped["p99_ms"] <= TARGET_P99_MS and shipped["failures"] == 0
    print(f"target ≥ {TARGET_RPS:.0f} req/s, p99 ≤ {TARGET_P99_MS:.0f} ms, no failures, one worker, log on: "
          f"{'met' if met else 'NOT met'}")  # fmt: skip
    for name, r in results.items():
        print(f"{name}: {r['answered']:,} predictions answered (warm-up included), {r['logged_rows']:,} rows in the "
              f"prediction log, {r['log_dropped']:.0f} dropped")  # fmt: skip
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps({"users": args.users, "seconds": args.seconds, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
