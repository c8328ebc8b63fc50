"""Time the serving paths, each beside its baseline measured in the same run.

- one encounter in process: validate the JSON body → clean → features → fast scorer → decision, against the bare
  `predict_proba` of the trained pipeline on a prepared one-row frame (the cost a straightforward service pays
  for the model alone);
- /predict_batch over HTTP on one worker with 10,000-encounter requests, prediction log on.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
import threadpoolctl
from pydantic import Field, create_model

sys.path.insert(0, str(Path(__file__).parent))
from serving_setup import prepare  # noqa: E402

from readmission_platform.lib.cleaning import clean_record  # noqa: E402
from readmission_platform.lib.encounter import Encounter, columns, features_frame, record, typed_frame  # noqa: E402
from readmission_platform.lib.features import record_features  # noqa: E402
from readmission_platform.lib.training import model_input  # noqa: E402
from readmission_platform.serving.model import serve  # noqa: E402
from readmission_platform.serving.server import running_server  # noqa: E402
from readmission_platform.serving.service import MAX_BATCH  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "serving.json"
TARGET_SINGLE_MS, TARGET_BATCH_PER_S, BATCH = 0.5, 100_000, 10_000
# The request model of /predict_batch, as BentoML builds it from the API's signature.
BATCH_INPUT = create_model("Input", encounters=(list[Encounter], Field(min_length=1, max_length=MAX_BATCH)))


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


def batch(setup, repeats: int) -> dict:
    """/predict_batch over HTTP, and in the same run the floors of its parts in process (medians of 3):
    json.loads of the body, pydantic's validation of it, the batch features and the model on them."""
    body = json.dumps({"encounters": setup.encounters[:BATCH]}).encode()
    model = serve(setup.candidate.model, {"name": "bench", "version": "1", "threshold": 0.5})
    validated = [Encounter.model_validate(e) for e in setup.encounters[:BATCH]]
    frame = features_frame(typed_frame(columns(validated)))
    single_thread = threadpoolctl.threadpool_limits(1)  # as a serving worker runs
    parts = {
        "json.loads": lambda: json.loads(body),
        "validate": lambda: BATCH_INPUT.model_validate_json(body),
        "features": lambda: features_frame(typed_frame(columns(validated))),
        "model": lambda: model.probabilities(frame),
    }
    floors = {name: statistics.median(timed(lambda _: part(), [None], 3)) for name, part in parts.items()}
    single_thread.unregister()
    seconds = []
    with running_server(setup.settings, bento=None, env={"READMISSION_SERVE_WORKERS": "1"}) as url:
        with httpx.Client(base_url=url, timeout=120, headers={"Content-Type": "application/json"}) as client:
            client.post("/predict_batch", content=body).raise_for_status()  # warm up
            for _ in range(repeats):
                started = time.perf_counter()
                answer = client.post("/predict_batch", content=body)
                seconds.append(time.perf_counter() - started)
                answer.raise_for_status()
                assert len(answer.json()["predictions"]) == BATCH
    median = statistics.median(seconds)
    return {"encounters": BATCH, "median_s": median, "per_s": BATCH / median, "parts_s": floors}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20_000, help="single-encounter calls (default 20,000)")
    parser.add_argument("--batch-repeats", type=int, default=7, help="/predict_batch requests (default 7)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="readmission_bench_serving_") as folder:
        print("training a model on the full data set and promoting it in a scratch registry …", flush=True)
        setup = prepare(Path(folder) / "home")
        one = single(setup, args.repeats)
        many = batch(setup, args.batch_repeats)
    stages = ", ".join(f"{name} {us:.0f} µs" for name, us in one["stages_median_us"].items())
    print(f"\none encounter in process (median of {args.repeats:,}): {one['median_ms'] * 1e3:.0f} µs "
          f"(p99 {one['p99_ms'] * 1e3:.0f} µs; {stages})")  # fmt: skip
    print(f"bare pipeline predict_proba on a prepared one-row frame: {one['bare_predict_proba_median_ms']:.2f} ms "
          f"→ the whole path is {one['ratio']:.0f}× faster than the model call alone")  # fmt: skip
    print(f"target median ≤ {TARGET_SINGLE_MS} ms: {'met' if one['median_ms'] <= TARGET_SINGLE_MS else 'NOT met'}")
    print(f"\n/predict_batch, {BATCH:,} encounters per request, one worker, log on (median of {args.batch_repeats}): "
          f"{many['median_s'] * 1e3:.0f} ms → {many['per_s']:,.0f} encounters/s "
          )  # fmt: skip
    parts = many["parts_s"]
    print("  its parts alone, in process: " + ", ".join(f"{k} {v * 1e3:.0f} ms" for k, v in parts.items())
          + f"; validation + features + model alone cap it at "
          f"{BATCH / (parts['validate'] + parts['features'] + parts['model']):,.0f} encounters/s")  # fmt: skip
    print(f"target ≥ {TARGET_BATCH_PER_S:,} encounters/s: {'met' if many['per_s'] >= TARGET_BATCH_PER_S else 'NOT met'}")
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps({"single": one, "batch": many}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
