"""Time the serving paths, each beside its baseline measured in the same run.

- one encounter in process: validate the JSON body → clean → features → fast scorer → decision, against the bare
  `predict_proba` of the trained pipeline on a prepared one-row frame (the cost a straightforward service pays
  for the model alone);
- /predict_batch: the CPU of each part of a 10,000-encounter request in process, beside the straightforward way
  (pydantic's request model and the pipeline's predict_proba); then over HTTP with one worker and one client, and with
  two workers and eight client processes, prediction log on; the target counts only a setting whose log kept every row;
- with a candidate in shadow (`--rollout` alone, or as part of the whole run): the CPU one worker spends per
  single-encounter request and per 10,000-encounter request over HTTP, beside production alone in the same run
  (target: at most 1.5×).
"""

from __future__ import annotations

import argparse
import http.client
import json
import multiprocessing
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import httpx
import polars as pl
import psutil
import threadpoolctl

sys.path.insert(0, str(Path(__file__).parent))
from serving_setup import prepare, wait_for_candidate  # noqa: E402

from readmission_platform.lib.cleaning import clean_record  # noqa: E402
from readmission_platform.lib.encounter import FIELDS, BatchRequest, Encounter, columns, features_frame, record  # noqa: E402
from readmission_platform.lib.features import record_features  # noqa: E402
from readmission_platform.lib.training import model_input  # noqa: E402
from readmission_platform.serving.fast.decode import decode_batch  # noqa: E402
from readmission_platform.serving.model import serve  # noqa: E402
from readmission_platform.serving.server import running_server  # noqa: E402
from readmission_platform.serving.prediction_log import _batch_message, _Store, count_predictions  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "serving.json"
TARGET_SINGLE_MS, TARGET_BATCH_PER_S, BATCH = 0.5, 100_000, 10_000
# (workers, client processes) of the /predict_batch runs. Each client keeps one connection, and a connection stays
# with the worker that accepted it: with four clients, one of two workers was seen to get all four. Eight share out
# more evenly; the CPU each server process spent is reported beside the figures, to show how evenly.
BATCH_SETTINGS = ((1, 1), (2, 8))
MAX_SHADOW_CPU = 1.5


def timed(function, items, repeats: int) -> list[float]:
    """Seconds of each call of `function` on the items in turn, `repeats` calls in all."""
    seconds = []
    for i in range(repeats):
        item = items[i % len(items)]
        started = time.perf_counter()
        function(item)
        seconds.append(time.perf_counter() - started)
    return seconds


def single(setup, repeats: int) -> dict:
    model = serve(setup.candidate.model, {"name": "bench", "version": "1", "threshold": setup.candidate.threshold,
                                          "base_rate": setup.candidate.validation["observed_rate"]})  # fmt: skip
    bodies = [json.dumps(e).encode() for e in setup.encounters[:2_000]]

    def path(body: bytes) -> tuple[float, bool, str]:
        encounter = Encounter.model_validate_json(body)
        probability = model.probability(record_features(clean_record(record(encounter))))
        return probability, probability >= model.threshold, model.risk_band(probability)

    rows = [model_input(setup.rows.slice(i, 1)) for i in range(200)]
    pipeline = setup.candidate.model
    for body in bodies[:500]:
        path(body)
    for row in rows[:20]:
        pipeline.predict_proba(row)
    encounters = [Encounter.model_validate_json(b) for b in bodies]
    features = [record_features(clean_record(record(e))) for e in encounters]
    stages = {
        "validate": timed(Encounter.model_validate_json, bodies, repeats),
        "clean + features": timed(lambda e: record_features(clean_record(record(e))), encounters, repeats),
        "score": timed(model.probability, features, repeats),
    }
    ours = timed(path, bodies, repeats)
    bare = timed(pipeline.predict_proba, rows, max(200, repeats // 100))
    result = {
        "median_ms": statistics.median(ours) * 1e3,
        "p99_ms": statistics.quantiles(ours, n=100)[98] * 1e3,
        "bare_predict_proba_median_ms": statistics.median(bare) * 1e3,
        "stages_median_us": {name: statistics.median(s) * 1e6 for name, s in stages.items()},
    }
    result["ratio"] = result["bare_predict_proba_median_ms"] / result["median_ms"]
    return result


def cpu_ms(function, repeats: int = 5) -> float:
    """Median CPU milliseconds of the process (all its threads) per call of `function`."""
    spent = []
    for _ in range(repeats):
        started = time.process_time()
        function()
        spent.append(time.process_time() - started)
    return statistics.median(spent) * 1e3


def batch_parts(setup, body: bytes) -> dict:
    """CPU of each part of one 10,000-encounter request in process, single-threaded as a worker runs, and of the same
    request the straightforward way: pydantic's request model (what BentoML does for a typed API) and the pipeline."""
    model = serve(setup.candidate.model, {"name": "bench", "version": "1", "threshold": 0.5, "base_rate": 0.1}, threads=1)
    encounters = decode_batch(body)
    features = features_frame(encounters)
    probability = model.probabilities(features)
    with tempfile.TemporaryDirectory() as folder, threadpoolctl.threadpool_limits(1):
        store = _Store(f"sqlite:///{folder}/predictions.sqlite", report=lambda **_: None)  # the writer process's side
        answers = pl.DataFrame({"probability": probability, "decision": probability >= 0.5, "risk_band": model.risk_bands(probability),
                                "request_id": [f"r{i}" for i in range(BATCH)]})  # fmt: skip
        logged = answers.with_columns(
            encounters.select(FIELDS),
            endpoint=pl.lit("predict_batch"), model_name=pl.lit("bench"), model_version=pl.lit("1"),
            predicted_at=pl.lit(datetime.now(UTC)),
        )  # fmt: skip
        store.write([logged])  # makes the table
        ours = {
            "decode + validate (msgspec)": cpu_ms(lambda: decode_batch(body)),
            "clean + features": cpu_ms(lambda: features_frame(encounters)),
            "score": cpu_ms(lambda: model.probabilities(features)),
        }
        logging = {
            "answer (JSON)": cpu_ms(answers.write_json),
            "log rows handed to the writer (Arrow IPC)": cpu_ms(lambda: _batch_message([logged])),
            "log insert (SQLite, in the writer process)": cpu_ms(lambda: store.write([logged])),
        }
        store.close()
        pipeline = setup.candidate.model
        validated = BatchRequest.model_validate_json(body).encounters
        baseline = {
            "validate (pydantic request model)": cpu_ms(lambda: BatchRequest.model_validate_json(body), 3),
            "clean + features": cpu_ms(lambda: features_frame(columns(validated)), 3),
            "pipeline predict_proba on pandas": cpu_ms(lambda: pipeline.predict_proba(model_input(features)), 3),
        }
    return {"ours_ms": ours, "baseline_ms": baseline, "log_ms": logging}


def _client(url: str, body: bytes, seconds: float, start, done) -> None:
    # The standard library's client on one kept-alive connection: it shares the 2 cores with the server, and spent
    # half the CPU per request httpx did (7-8 ms against 15-18).
    host, port = url.removeprefix("http://").rsplit(":", 1)
    connection = http.client.HTTPConnection(host, int(port), timeout=120)
    headers = {"Content-Type": "application/json", "Content-Length": str(len(body))}
    start.wait()
    stop, answered = time.perf_counter() + seconds, 0
    while time.perf_counter() < stop:
        connection.request("POST", "/predict_batch", body=body, headers=headers)
        answer = connection.getresponse()
        content = answer.read()
        if answer.status != 200:
            raise RuntimeError(f"/predict_batch answered {answer.status}: {content[:500]!r}")
        answered += 1
    connection.close()
    done.put((answered, time.perf_counter()))


def _server_processes(url: str) -> list[psutil.Process]:
    """The `bentoml serve` process listening at `url` and every process it started."""
    port = url.rsplit(":", 1)[-1]
    for process in psutil.process_iter(["cmdline"]):
        command = process.info["cmdline"] or []
        if "serve" in command and "--port" in command and command[command.index("--port") + 1] == port:
            return [process, *process.children(recursive=True)]
    return []


def _cpu_seconds(processes: list[psutil.Process]) -> dict[int, float]:
    spent = {}
    for process in processes:
        try:
            times = process.cpu_times()
        except psutil.Error:
            continue
        spent[process.pid] = times.user + times.system
    return spent


def batch_over_http(setup, body: bytes, workers: int, clients: int, seconds: float) -> dict:
    """Encounters/s of `clients` client processes each sending 10,000-encounter requests without pause for `seconds`
    to `bentoml serve` with `workers` workers and the prediction log on; the log's rows are counted afterwards, beside
    the drops the service counted in /metrics."""
    context = multiprocessing.get_context("spawn")
    with tempfile.TemporaryDirectory() as folder:
        log_url = f"sqlite:///{folder}/predictions.sqlite"
        env = {"READMISSION_SERVE_WORKERS": str(workers), "READMISSION_PREDICTION_LOG_URL": log_url}
        server_log = RESULTS.parent / f"bentoml-serve-predict-batch-{workers}w.log"
        server_log.parent.mkdir(exist_ok=True)
        with running_server(setup.settings, bento=None, env=env, log_path=server_log) as url:
            with httpx.Client(base_url=url, timeout=120, headers={"Content-Type": "application/json"}) as client:
                for _ in range(2 * workers):  # warm up every worker
                    client.post("/predict_batch", content=body).raise_for_status()
            start, done = context.Barrier(clients + 1), context.Queue()
            senders = [context.Process(target=_client, args=(url, body, seconds, start, done)) for _ in range(clients)]
            for sender in senders:
                sender.start()
            server = _server_processes(url)
            start.wait()
            began, cpu_before = time.perf_counter(), _cpu_seconds(server)
            results = [done.get(timeout=seconds + 300) for _ in senders]
            cpu_after = _cpu_seconds(server)
            for sender in senders:
                sender.join()
            elapsed = max(end for _, end in results) - began
            metrics = httpx.get(f"{url}/metrics").text.splitlines()
        logged = count_predictions(log_url)
    dropped = sum(float(line.split()[-1]) for line in metrics if line.startswith("readmission_prediction_log_dropped_total"))
    answered = sum(n for n, _ in results)
    # CPU seconds of each busy server process (the workers) while the clients ran.
    busy = sorted((after - cpu_before[pid] for pid, after in cpu_after.items() if pid in cpu_before), reverse=True)
    server_cpu = [round(spent, 1) for spent in busy if spent >= 0.5]
    return {"workers": workers, "clients": clients, "requests": answered, "seconds": elapsed,
            "server_cpu_s": server_cpu, "server_cpu_ms_per_request": sum(busy) / answered * 1e3,
            "per_s": answered * BATCH / elapsed, "logged": logged, "log_dropped": int(dropped), "server_log": str(server_log),
            "answered_encounters": (answered + 2 * workers) * BATCH}  # fmt: skip


def shadow_cpu(setup, body: bytes, singles: int, batches: int) -> dict:
    """Worker CPU ms per request, production alone and with a shadow: `singles` /predict requests, then `batches`
    10,000-encounter /predict_batch requests, from one client on one kept-alive connection, prediction log on."""
    bodies = [json.dumps(e).encode() for e in setup.encounters[:2_000]]
    result = {}
    with tempfile.TemporaryDirectory() as folder:
        for shadow in (False, True):
            version = setup.set_shadow(shadow)
            env = {"READMISSION_SERVE_WORKERS": "1", "READMISSION_PREDICTION_LOG_URL": f"sqlite:///{folder}/p{int(shadow)}.sqlite"}
            with running_server(setup.settings, bento=None, env=env) as url:
                wait_for_candidate(url, version)
                server = _server_processes(url)
                host, port = url.removeprefix("http://").rsplit(":", 1)
                connection = http.client.HTTPConnection(host, int(port), timeout=120)
                headers = {"Content-Type": "application/json"}

                def send(route: str, content: bytes) -> None:
                    connection.request("POST", route, body=content, headers=headers)
                    answer = connection.getresponse()
                    if answer.status != 200:
                        raise RuntimeError(f"{route} answered {answer.status}: {answer.read()[:300]!r}")
                    answer.read()

                for content in bodies[:200]:  # warm up
                    send("/predict", content)
                send("/predict_batch", body)
                per = {}
                for route, contents in (("/predict", [bodies[i % len(bodies)] for i in range(singles)]), ("/predict_batch", [body] * batches)):
                    before = sum(_cpu_seconds(server).values())
                    for content in contents:
                        send(route, content)
                    per[route] = (sum(_cpu_seconds(server).values()) - before) / len(contents) * 1e3
                connection.close()
            result["with a shadow" if shadow else "production alone"] = per
    setup.set_shadow(False)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20_000, help="single-encounter calls (default 20,000)")
    parser.add_argument("--batch-seconds", type=float, default=20, help="seconds of /predict_batch load per run (default 20)")
    parser.add_argument("--batch-rounds", type=int, default=3, help="runs of each /predict_batch setting (default 3)")
    parser.add_argument("--rollout", action="store_true", help="only the cost of a shadow against production alone")
    parser.add_argument("--rollout-singles", type=int, default=3_000, help="/predict requests per setting (default 3,000)")
    parser.add_argument("--rollout-batches", type=int, default=10, help="/predict_batch requests per setting (default 10)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="readmission_bench_serving_") as folder:
        print("training a model on the full data set and promoting it in a scratch registry …", flush=True)
        setup = prepare(Path(folder) / "home")
        body = json.dumps({"encounters": setup.encounters[:BATCH]}).encode()
        shadowed = shadow_cpu(setup, body, args.rollout_singles, args.rollout_batches)
        print_shadow(shadowed, args.rollout_singles, args.rollout_batches)
        if args.rollout:
            RESULTS.parent.mkdir(exist_ok=True)
            RESULTS.with_name("serving_rollout.json").write_text(json.dumps(shadowed, indent=2))
            return 0
        one = single(setup, args.repeats)
        parts = batch_parts(setup, body)
        # Round by round, so a busy spell of the shared machine falls on every setting alike.
        runs = [batch_over_http(setup, body, workers, clients, args.batch_seconds)
                for _ in range(args.batch_rounds) for workers, clients in BATCH_SETTINGS]  # fmt: skip
    over_http = [
        {"workers": workers, "clients": clients, "runs": group,
         "median_per_s": statistics.median(run["per_s"] for run in group),
         "all_logged": all(run["logged"] == run["answered_encounters"] for run in group)}
        for workers, clients in BATCH_SETTINGS
        if (group := [run for run in runs if (run["workers"], run["clients"]) == (workers, clients)])
    ]  # fmt: skip
    stages = ", ".join(f"{name} {us:.0f} µs" for name, us in one["stages_median_us"].items())
    print(f"\none encounter in process (median of {args.repeats:,}): {one['median_ms'] * 1e3:.0f} µs "
          f"(p99 {one['p99_ms'] * 1e3:.0f} µs; {stages})")  # fmt: skip
    print(f"bare pipeline predict_proba on a prepared one-row frame: {one['bare_predict_proba_median_ms']:.2f} ms "
          f"→ the whole path is {one['ratio']:.0f}× faster than the model call alone")  # fmt: skip
    print(f"target median ≤ {TARGET_SINGLE_MS} ms: {'met' if one['median_ms'] <= TARGET_SINGLE_MS else 'NOT met'}")
    ours, baseline = sum(parts["ours_ms"].values()), sum(parts["baseline_ms"].values())
    print(f"\none {BATCH:,}-encounter request in process, CPU ms (one thread, medians):")
    print("  " + ", ".join(f"{name} {ms:.0f}" for name, ms in parts["ours_ms"].items()) + f" → {ours:.0f}")
    print("  the straightforward way: " + ", ".join(f"{name} {ms:.0f}" for name, ms in parts["baseline_ms"].items())
          + f" → {baseline:.0f}, {baseline / ours:.1f}× the CPU")  # fmt: skip
    print("  the prediction log, either way: " + ", ".join(f"{name} {ms:.0f}" for name, ms in parts["log_ms"].items())
          + f" → {sum(parts['log_ms'].values()):.0f}")  # fmt: skip
    print(f"/predict_batch over HTTP, {BATCH:,} encounters per request, prediction log on, {args.batch_rounds} runs "
          f"of {args.batch_seconds:.0f} s per setting:")  # fmt: skip
    for setting in over_http:
        print(f"  {setting['workers']} worker(s), {setting['clients']} client(s): median {setting['median_per_s']:,.0f} encounters/s")
        for run in setting["runs"]:
            print(f"    {run['per_s']:,.0f}/s ({run['requests']} requests; log holds {run['logged']:,} of "
                  f"{run['answered_encounters']:,}, {run['log_dropped']:,} dropped and counted; server CPU "
                  f"{run['server_cpu_ms_per_request']:.0f} ms per request, busy processes "
                  f"{', '.join(f'{s:.1f} s' for s in run['server_cpu_s'])} of {run['seconds']:.1f} s)")  # fmt: skip
            if run["logged"] + run["log_dropped"] != run["answered_encounters"]:
                print(f"      the log misses predictions it did not count as dropped; see {run['server_log']}")
    # A setting counts only if its log kept every prediction: a writer that falls behind drops rows (counted), which
    # frees CPU for answering and would flatter the figure.
    best = max((setting["median_per_s"] for setting in over_http if setting["all_logged"]), default=0.0)
    print(f"target ≥ {TARGET_BATCH_PER_S:,} encounters/s with every prediction logged: "
          f"{'met' if best >= TARGET_BATCH_PER_S else 'NOT met'} (best median of a setting whose log kept every row: "
          f"{best:,.0f})")  # fmt: skip
    many = {"parts": parts, "over_http": over_http}
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps({"single": one, "batch": many, "shadow": shadowed}, indent=2))
    return 0


def print_shadow(shadowed: dict, singles: int, batches: int) -> None:
    alone, shadow = shadowed["production alone"], shadowed["with a shadow"]
    print(f"\nworker CPU per request, one worker, prediction log on ({singles:,} /predict, {batches} /predict_batch of {BATCH:,}):")
    for route in alone:
        ratio = shadow[route] / alone[route]
        print(f"  {route:15} production alone {alone[route]:8.2f} ms   with a shadow {shadow[route]:8.2f} ms   "
              f"{ratio:.2f}× (≤ {MAX_SHADOW_CPU}×: {'met' if ratio <= MAX_SHADOW_CPU else 'NOT met'})")  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
