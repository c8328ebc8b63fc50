"""History at prediction time over HTTP: `bentoml serve` with a patient key looks up the state the pipeline stored,
answers as the pipeline scores the training set's row, says whether history was used, and keeps no identifier."""

from __future__ import annotations

import time

import httpx
import polars as pl
import pytest

from readmission_platform.lib.encounter import from_clean
from readmission_platform.lib.history import ENCOUNTER, HISTORY_FEATURES, PATIENT, patient_keys, patient_states
from readmission_platform.lib.history_store import KEY, write_states
from readmission_platform.lib.predictions import read_predictions
from readmission_platform.lib.splitting import SPLIT
from readmission_platform.lib.training import LOGISTIC_REGRESSION, predict_probability, train_candidates
from readmission_platform.serving.prediction_log import engine_for
from readmission_platform.serving.server import running_server
from readmission_platform_tests.serving.conftest import register, registry_of

PATIENT_KEY = "history-test-key"
PREFIX = "MRN-"  # the hospital's identifiers: text no other value of the log or the service's output holds


def identifier(patient: int) -> str:
    return f"{PREFIX}{patient}"


@pytest.fixture(scope="module")
def served(tmp_path_factory, new_home, sample_parts, full_raw, full_clean, full_features):
    """300 test encounters, each its patient's last with at least one before it, served with the states the pipeline
    stored from every other encounter; the server, its settings and log, the requests and their training rows."""
    settings = new_home(tmp_path_factory.mktemp("history"))
    # The linear model: seconds to fit, and its fast path reads every history feature's coefficient.
    (candidate,) = train_candidates(sample_parts["train"], sample_parts["validation"], families=(LOGISTIC_REGRESSION,))
    register(registry_of(settings), candidate, sample_parts, promote=True)
    last = full_raw.select(pl.col(ENCOUNTER).cast(pl.Int64), pl.col(PATIENT).cast(pl.Int64)).group_by(PATIENT).agg(pl.col(ENCOUNTER).max())
    rows = (
        full_features.slice(20_000).filter((pl.col(SPLIT) == "test") & (pl.col("history_prior_encounters") > 0))
        .join(last, on=[PATIENT, ENCOUNTER], how="semi").head(300)
    )  # fmt: skip
    earlier = full_raw.filter(~pl.col(ENCOUNTER).cast(pl.Int64).is_in(rows[ENCOUNTER].implode()))
    states = patient_states(earlier)
    keys = patient_keys([identifier(p) for p in states[PATIENT]], PATIENT_KEY.encode())
    write_states(engine_for(settings.prediction_log_url), states.with_columns(pl.Series(KEY, keys)).drop(PATIENT))
    clean_rows = rows.select(ENCOUNTER).join(full_clean.frame, on=ENCOUNTER, how="left", maintain_order="left")
    requests = [from_clean(r) | {"patient_id": identifier(r[PATIENT])} for r in clean_rows.iter_rows(named=True)]
    log_path = settings.home / "logs" / "history.log"
    env = {"READMISSION_PATIENT_KEY": PATIENT_KEY, "READMISSION_RELOAD_SECONDS": "1"}
    with running_server(settings, bento=None, env=env, log_path=log_path) as url, httpx.Client(base_url=url, timeout=120) as client:
        expected = predict_probability(candidate.model, rows)
        first = predict_probability(candidate.model, rows.with_columns(pl.lit(0.0).alias(n) for n in HISTORY_FEATURES))
        yield client, settings, log_path, requests, expected, first


def test_single_and_batch_answers_use_the_stored_history_as_training_did(served):
    client, _, _, requests, expected, first = served
    single = [client.post("/predict", json=r).json() for r in requests]
    assert all(a["history_used"] for a in single)
    assert [a["probability"] for a in single] == pytest.approx(list(expected), abs=1e-9)
    assert max(abs(a - b) for a, b in zip(expected, first, strict=True)) > 0.01  # history moved the answers
    mixed = [r if i % 2 else {k: v for k, v in r.items() if k != "patient_id"} for i, r in enumerate(requests)]
    batch = client.post("/predict_batch", json={"encounters": mixed}).json()["predictions"]
    assert [p["history_used"] for p in batch] == [bool(i % 2) for i in range(len(requests))]
    wanted = [e if i % 2 else f for i, (e, f) in enumerate(zip(expected, first, strict=True))]
    assert [p["probability"] for p in batch] == pytest.approx(wanted, abs=1e-9)


def test_without_an_identifier_the_answer_says_no_history_was_used(served):
    client, _, _, requests, _, first = served
    bare = {k: v for k, v in requests[0].items() if k != "patient_id"}
    answer = client.post("/predict", json=bare).json()
    assert answer["history_used"] is False and answer["probability"] == pytest.approx(first[0], abs=1e-9)
    explained = client.post("/explain", json=requests[0]).json()
    assert explained["history_used"] is True
    assert {c["feature"] for c in explained["contributions"]} >= set(HISTORY_FEATURES)
    refused = client.post("/predict", json=bare | {"patient_id": "x" * 65})
    assert refused.status_code in (400, 422) and "patient_id" in refused.text


def test_no_raw_identifier_is_stored_or_logged(served):
    client, settings, log_path, requests, _, _ = served
    for r in requests[:20]:
        assert client.post("/predict", json=r | {"request_id": "kept"}).status_code == 200
    batch = [r | {"request_id": f"kept-{i}"} if i % 2 else {k: v for k, v in r.items() if k != "patient_id"} | {"request_id": f"kept-{i}"}
             for i, r in enumerate(requests[:4])]  # fmt: skip
    assert client.post("/predict_batch", json={"encounters": batch}).status_code == 200
    client.post("/predict", json=requests[0] | {"age": "[200-210)"})  # refused: the error names the field, not the id
    home_files = [p for p in settings.home.rglob("*") if p.is_file() and "mlflow" not in p.parts and "bentoml" not in p.parts]
    assert any(p.name.startswith("predictions.sqlite") for p in home_files)
    # Rows reach the log within its flush interval; wait for the ones just sent, then look for any identifier.
    deadline = time.monotonic() + 60
    while (read_predictions(settings.prediction_log_url, ["request_id"])["request_id"].str.starts_with("kept")).sum() < 24:
        assert time.monotonic() < deadline, "the predictions did not reach the log"
        time.sleep(0.5)
    # What the log keeps of the patient instead: the keyed hash, by which an outcome reaches the patient's history.
    logged = read_predictions(settings.prediction_log_url, ["request_id", "patient_key"])
    hashed = logged.filter(pl.col("request_id") == "kept")["patient_key"]
    assert sorted(hashed) == sorted(patient_keys([r["patient_id"] for r in requests[:20]], PATIENT_KEY.encode()))
    by_request = dict(logged.filter(pl.col("request_id").str.starts_with("kept-")).iter_rows())
    assert by_request == {f"kept-{i}": patient_keys([r["patient_id"]], PATIENT_KEY.encode())[0] if i % 2 else None
                          for i, r in enumerate(requests[:4])}  # fmt: skip
    held = {p: p.read_bytes() for p in home_files if p.exists()} | {log_path: log_path.read_bytes()}
    found = [str(p) for p, content in held.items() if PREFIX.encode() in content]
    assert found == [], f"a raw patient identifier is held in {found}"
