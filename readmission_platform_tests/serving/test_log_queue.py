"""A worker whose prediction log queue is too small for a batch: the answer does not wait, the rows are counted."""

import httpx

from readmission_platform.lib.predictions import read_predictions
from readmission_platform.serving.model import SMOKE_ENCOUNTERS
from readmission_platform.serving.server import running_server
from readmission_platform_tests.serving.conftest import register, registry_of


def dropped(client: httpx.Client) -> float:
    lines = client.get("/metrics").text.splitlines()
    return sum(float(line.split()[-1]) for line in lines if line.startswith("readmission_prediction_log_dropped_total"))


def test_predictions_past_the_log_queue_are_answered_dropped_and_counted(tmp_path, new_home, sample_candidates, sample_parts):
    settings = new_home(tmp_path)
    register(registry_of(settings), sample_candidates["logistic_regression"], sample_parts, promote=True)
    log_url = f"sqlite:///{tmp_path / 'predictions.sqlite'}"
    env = {"READMISSION_PREDICTION_LOG_QUEUE_ROWS": "2", "READMISSION_PREDICTION_LOG_URL": log_url}
    with running_server(settings, bento=None, env=env) as url, httpx.Client(base_url=url, timeout=60) as client:
        encounters = [dict(e, request_id=f"b{i}") for i, e in enumerate(SMOKE_ENCOUNTERS[:3])]
        batch = client.post("/predict_batch", json={"encounters": encounters})
        assert batch.status_code == 200 and [p["request_id"] for p in batch.json()["predictions"]] == ["b0", "b1", "b2"]
        assert dropped(client) == 3  # three rows do not fit a queue of two: the whole batch is dropped
        single = client.post("/predict", json=dict(SMOKE_ENCOUNTERS[0], request_id="s1"))
        assert single.status_code == 200
        assert dropped(client) == 3
    assert read_predictions(log_url)["request_id"].to_list() == ["s1"]
