"""The service under a real `bentoml serve .` from the repository root, on a free loopback port, with two workers
(two processes, each with its model, its reload thread and its log writer process, appending to one SQLite log)."""

from __future__ import annotations

import json
import threading
import time
from contextlib import ExitStack

import httpx
import psutil
import pytest

from readmission_platform.lib.features import FEATURE_COLUMNS
from readmission_platform.lib.encounter import FIELDS, MAX_BATCH
from readmission_platform.lib.predictions import read_predictions
from readmission_platform.lib.training import predict_probability
from readmission_platform.serving.model import SMOKE_ENCOUNTERS
from readmission_platform.serving.server import running_server
from readmission_platform_tests.serving.conftest import break_artifacts, register, registry_of

GOOD = dict(SMOKE_ENCOUNTERS[0])


class Server:
    def __init__(self, settings, candidates, parts):
        self.settings = settings
        self.registry = registry_of(settings)
        self.candidates = candidates
        self.parts = parts
        self.first = register(self.registry, candidates["hist_gradient_boosting"], parts, promote=True)
        self._stack = ExitStack()
        self.url = self._stack.enter_context(
            running_server(settings, bento=None, env={"READMISSION_RELOAD_SECONDS": "1", "READMISSION_SERVE_WORKERS": "2"})
        )
        self.client = httpx.Client(base_url=self.url, timeout=60)

    def stop(self) -> None:
        self.client.close()
        self._stack.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory, new_home, sample_candidates, sample_parts):
    started = Server(new_home(tmp_path_factory.mktemp("serving")), sample_candidates, sample_parts)
    yield started
    started.stop()


def metric(server: Server, name: str, **labels: str) -> float:
    text = server.client.get("/metrics").text
    wanted = [f'{k}="{v}"' for k, v in labels.items()]
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and all(w in line for w in wanted):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_ready_with_the_production_model_and_it_describes_it(server):
    assert server.client.get("/livez").status_code == 200
    assert server.client.get("/readyz").status_code == 200
    assert server.client.get("/").status_code == 200  # BentoML's own page, next to the mounted /model
    info = server.client.get("/model").json()
    assert info["version"] == server.first and info["alias"] == "production"
    assert info["family"] == "hist_gradient_boosting"
    assert info["threshold"] == pytest.approx(server.candidates["hist_gradient_boosting"].threshold)
    assert info["trained_batches"] == ["batch_0001", "batch_0002"] and info["trained_at"].startswith("2026-11-22")
    assert info["test_metrics"] == {"brier": 0.09, "roc_auc": 0.66}
    assert "occlusion" in info["explain_method"] and info["served_from"].startswith("MLflow registry sqlite:///")


def test_predict_names_probability_decision_band_version_and_echoes_the_request_id(server):
    answer = server.client.post("/predict", json=GOOD | {"request_id": "client-42"})
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["request_id"] == "client-42" and body["model_version"] == server.first
    assert body["model_name"] == "readmission-classifier"
    assert 0 < body["probability"] < 1 and body["decision"] == (body["probability"] >= body["threshold"])
    assert body["risk_band"] in ("low", "medium", "high")
    assert server.client.post("/predict", json=GOOD).json()["request_id"]  # one is made up when none is sent


def test_probabilities_equal_the_batch_pipeline_for_1000_test_encounters(server, test_encounters):
    requests, rows = test_encounters
    expected = predict_probability(server.candidates["hist_gradient_boosting"].model, rows)
    single = [server.client.post("/predict", json=r).json()["probability"] for r in requests]
    batch = server.client.post("/predict_batch", json={"encounters": requests}).json()
    assert max(abs(a - b) for a, b in zip(single, expected, strict=True)) < 1e-9
    assert [p["probability"] for p in batch["predictions"]] == pytest.approx(list(expected), abs=1e-12)
    assert batch["model_version"] == server.first
    threshold = batch["threshold"]
    assert all(p["decision"] == (p["probability"] >= threshold) for p in batch["predictions"])
    assert 0 < sum(p["decision"] for p in batch["predictions"]) < 1_000


def test_batch_answers_in_order_and_echoes_request_ids(server, test_encounters):
    requests = [r | {"request_id": f"row-{i}"} for i, r in enumerate(test_encounters[0][:300])]
    observed = metric(server, "readmission_prediction_probability_count")
    answer = server.client.post("/predict_batch", json={"encounters": requests}).json()
    assert [p["request_id"] for p in answer["predictions"]] == [f"row-{i}" for i in range(300)]
    # Every encounter of the batch is observed in the probability histogram (/metrics sums the workers').
    assert metric(server, "readmission_prediction_probability_count") == observed + 300


BAD_BODIES = {
    "missing required field": ({k: v for k, v in GOOD.items() if k != "age"}, ["age"], "Field required"),
    "wrong type": (GOOD | {"num_medications": "sixteen"}, ["num_medications"], "valid integer"),
    "unknown category": (GOOD | {"race": "Martian"}, ["race"], "'Caucasian'"),
    "out of range": (GOOD | {"time_in_hospital": 40}, ["time_in_hospital"], "less than or equal to 14"),
    "extra field": (GOOD | {"patient_nbr": 8222157}, ["patient_nbr"], "Extra inputs are not permitted"),
    "null for a required field": (GOOD | {"gender": None}, ["gender"], "'Female' or 'Male'"),
    "not an object": ([GOOD], [], "Input should be an object"),
}


@pytest.mark.parametrize("case", BAD_BODIES, ids=list(BAD_BODIES))
def test_bad_input_is_a_4xx_naming_each_offending_field(server, case):
    body, location, says = BAD_BODIES[case]
    before = metric(server, "readmission_rejected_requests_total", route="/predict")
    answer = server.client.post("/predict", json=body)
    assert answer.status_code == 400, answer.text
    details = answer.json()["detail"]
    assert [d["loc"] for d in details] == [location] and says in details[0]["msg"]
    assert metric(server, "readmission_rejected_requests_total", route="/predict") == before + 1
    assert server.client.get("/readyz").status_code == 200
    assert server.client.post("/predict", json=GOOD).status_code == 200


@pytest.mark.parametrize(
    ("content", "says"),
    [(b"", "Field required"), (b'{"age": "[70-80)",', "Invalid JSON"), (b"\xff\xfe", "Invalid JSON")],
    ids=["empty body", "malformed JSON", "not UTF-8"],
)
def test_empty_or_malformed_bodies_are_a_400_that_says_so(server, content, says):
    answer = server.client.post("/predict", content=content, headers={"Content-Type": "application/json"})
    assert answer.status_code == 400 and says in answer.text
    assert server.client.get("/readyz").status_code == 200


def test_batch_errors_name_the_row_and_field_and_the_limit_is_enforced(server):
    answer = server.client.post("/predict_batch", json={"encounters": [GOOD, GOOD | {"age": "old"}]})
    assert answer.status_code == 400
    assert [d["loc"] for d in answer.json()["detail"]] == [["encounters", 1, "age"]]
    empty = server.client.post("/predict_batch", json={"encounters": []})
    assert empty.status_code == 400 and "at least 1" in empty.text
    oversized = server.client.post(
        "/predict_batch", content=json.dumps({"encounters": [GOOD] * (MAX_BATCH + 1)}), headers={"Content-Type": "application/json"}
    )
    assert oversized.status_code == 400 and f"at most {MAX_BATCH:,}".replace(",", "") in oversized.text.replace(",", "")
    assert server.client.post("/predict_batch", json={"encounters": [GOOD] * 10_000}).status_code == 200


def test_the_openapi_spec_shows_the_batch_route_and_its_request_body(server):
    spec = server.client.get("/docs.json").json()
    batch = spec["paths"]["/predict_batch"]["post"]
    encounters = batch["requestBody"]["content"]["application/json"]["schema"]["properties"]["encounters"]
    assert encounters["maxItems"] == MAX_BATCH and encounters["minItems"] == 1
    assert {"A1Cresult", "glyburide-metformin", "request_id"} <= set(encounters["items"]["properties"])
    assert {"/predict", "/explain", "/model"} <= set(spec["paths"])


def test_explain_ranks_every_feature_by_its_push(server):
    answer = server.client.post("/explain", json=GOOD | {"request_id": "why"}).json()
    contributions = [c["contribution"] for c in answer["contributions"]]
    assert len(contributions) == len(FEATURE_COLUMNS) and contributions == sorted(contributions, key=abs, reverse=True)
    assert answer["model_version"] == server.first and "occlusion" in answer["method"]
    assert answer["probability"] == server.client.post("/predict", json=GOOD).json()["probability"]
    assert {c["feature"] for c in answer["contributions"]} >= {"diag_1_group", "number_inpatient", "insulin"}


def test_metrics_count_predictions_by_version_and_decision_and_the_probability_histogram(server):
    flagged = metric(server, "readmission_predictions_total", model_version=server.first, decision="flagged")
    unflagged = metric(server, "readmission_predictions_total", model_version=server.first, decision="not_flagged")
    server.client.post("/predict", json=GOOD)
    assert metric(server, "readmission_predictions_total", model_version=server.first) == flagged + unflagged + 1
    assert metric(server, "readmission_prediction_probability_count") >= flagged + unflagged + 1
    assert metric(server, "readmission_model_reloads_total", outcome="loaded") >= 1
    assert metric(server, "readmission_prediction_log_dropped_total") == 0
    assert "bentoml_service_request_total" in server.client.get("/metrics").text


def test_a_promotion_is_picked_up_without_a_restart_or_a_failed_request(server):
    answers: list[tuple[int, str | None]] = []
    done = threading.Event()

    def keep_asking() -> None:
        with httpx.Client(base_url=server.url, timeout=30) as client:
            while not done.is_set():
                answer = client.post("/predict", json=GOOD)
                answers.append((answer.status_code, answer.json().get("model_version") if answer.status_code == 200 else None))

    asker = threading.Thread(target=keep_asking)
    asker.start()
    try:
        time.sleep(1)
        second = register(server.registry, server.candidates["logistic_regression"], server.parts, promote=True)
        deadline = time.monotonic() + 30
        while not (len(answers) > 20 and {v for _, v in answers[-20:]} == {second}) and time.monotonic() < deadline:
            time.sleep(0.2)
    finally:
        done.set()
        asker.join()
    assert answers and all(status == 200 for status, _ in answers), {s for s, _ in answers}
    versions = [v for _, v in answers]
    # Each worker swaps on its own check: until both have, answers may come from either version.
    assert set(versions[: versions.index(second)]) == {server.first} and set(versions[-20:]) == {second}
    assert set(versions) == {server.first, second}
    # A kept-alive connection stays with one worker: ask on fresh connections until every worker has swapped.
    deadline = time.monotonic() + 30
    while {httpx.get(f"{server.url}/model").json()["version"] for _ in range(8)} != {second}:
        assert time.monotonic() < deadline, "a worker never swapped to the promoted version"
        time.sleep(0.3)
    assert server.client.get("/model").json()["family"] == "logistic_regression"
    assert "exact" in server.client.post("/explain", json=GOOD).json()["method"]
    server.second = second


def test_a_version_that_fails_to_load_leaves_the_current_one_serving(server):
    failed_before = metric(server, "readmission_model_reloads_total", outcome="failed")
    broken = register(server.registry, server.candidates["random_forest"], server.parts, promote=False)
    break_artifacts(server.registry, broken)
    server.registry.promote(broken, reason="test: a broken version")
    deadline = time.monotonic() + 20
    while metric(server, "readmission_model_reloads_total", outcome="failed") == failed_before:
        assert time.monotonic() < deadline, "the broken version was never tried"
        time.sleep(0.3)
    answer = server.client.post("/predict", json=GOOD)
    assert answer.status_code == 200 and answer.json()["model_version"] == server.second
    assert server.client.get("/readyz").status_code == 200
    # /model says which version serves, and that the one promoted did not load (each worker once it has tried).
    while (described := server.client.get("/model").json())["production_not_loaded"] is None:
        assert time.monotonic() < deadline, "no worker said the promoted version did not load"
        time.sleep(0.3)
    assert described["version"] == server.second
    assert described["production_not_loaded"]["version"] == broken
    assert described["production_not_loaded"]["error"].startswith("did not load (see the service's log)")


def writer_processes(worker: int) -> list[psutil.Process]:
    """The prediction log's writer processes of the server a worker belongs to: its workers' children."""
    server = psutil.Process(worker).parent()
    return [p for p in server.children(recursive=True) if "readmission_platform.serving.prediction_log" in p.cmdline()]


def test_a_clean_stop_keeps_every_prediction_in_the_log_without_identifiers(server):
    logged = metric(server, "readmission_predictions_total")
    for i in range(200):
        assert server.client.post("/predict", json=GOOD | {"request_id": f"last-{i}"}).status_code == 200
    writers = writer_processes(server.client.get("/model").json()["worker_pid"])
    assert len(writers) == 2  # one a worker
    server.stop()
    assert not [w.pid for w in writers if w.is_running() and w.status() != psutil.STATUS_ZOMBIE]  # each ended with its worker
    rows = read_predictions(server.settings.prediction_log_url).rows(named=True)
    assert len(rows) == logged + 200
    assert [r["request_id"] for r in rows[-200:]] == [f"last-{i}" for i in range(200)]
    last = rows[-1]
    assert last["model_version"] == server.second and last["endpoint"] == "predict"
    inputs = {name: last[name] for name in FIELDS}
    assert inputs == GOOD and not {"encounter_id", "patient_nbr"} & set(last)
    assert {r["endpoint"] for r in rows} == {"predict", "predict_batch", "explain"}
