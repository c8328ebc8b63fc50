"""The rollout end to end: a planted bad candidate (one that raises, one whose scores are shifted) put behind `shadow`
by the registry, served by a real `bentoml serve .` with two workers, is rolled back by `rollout_sensor` from the
prediction log, with every request answered (`make rollout`: minutes, so not in `make test`)."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import dagster as dg
import httpx
import polars as pl
import pytest

from readmission_platform.defs.promotion.sensors import rollout_sensor
from readmission_platform.defs.resources import (
    MlflowResource,
    PredictionLogResource,
    RolloutPolicyResource,
    WarehouseResource,
)
from readmission_platform.lib.predictions import read_predictions
from readmission_platform.lib.warehouse import open_warehouse
from readmission_platform.serving.server import running_server
from readmission_platform_tests.serving.conftest import register, registry_of
from readmission_platform_tests.serving.planted import MARKER, MARKER_COLUMN, Planted
from readmission_platform_tests.serving.shifted import Shifted

pytestmark = pytest.mark.rollout
REQUESTS = 120


@pytest.fixture(scope="module")
def served(tmp_path_factory, new_home, sample_candidates, sample_parts):
    """Production (the boosted trees) in a two-worker `bentoml serve .` that checks the aliases every second."""
    settings = new_home(tmp_path_factory.mktemp("rollout-e2e"))
    registry = registry_of(settings)
    production = register(registry, sample_candidates["hist_gradient_boosting"], sample_parts, promote=True)
    env = {"READMISSION_RELOAD_SECONDS": "1", "READMISSION_SERVE_WORKERS": "2", "READMISSION_CANDIDATE_TIMEOUT_MS": "500"}
    with running_server(settings, bento=None, env=env, ready_within=300) as url:
        yield settings, registry, production, url


def every_worker_holds(url: str, version: str | None, within: float = 180.0) -> None:
    """Wait until `/model` on fresh connections (either worker) names `version` as the candidate 8 times running."""
    deadline = time.monotonic() + within
    while not all(str((httpx.get(f"{url}/model", timeout=30).json().get("candidate") or {}).get("version")) == str(version) for _ in range(8)):
        assert time.monotonic() < deadline, httpx.get(f"{url}/model").json().get("candidate")
        time.sleep(0.5)


def tick(settings):
    context = dg.build_sensor_context(
        instance=dg.DagsterInstance.ephemeral(),
        resources={
            "warehouse": WarehouseResource(url=settings.warehouse_url),
            "mlflow": MlflowResource(tracking_uri=settings.mlflow_tracking_uri, artifact_root=settings.mlflow_artifact_root.as_uri()),
            "prediction_log": PredictionLogResource(url=settings.prediction_log_url),
            "rollout_policy": RolloutPolicyResource(stage_seconds=0, min_requests=100),
        },
    )
    return rollout_sensor(context)


@pytest.mark.parametrize(
    ("kind", "says"),
    [("raise", "v{version} rolled back from shadow: it failed"), ("shift", "its probabilities shifted against production's")],
)
def test_a_planted_bad_candidate_is_rolled_back_by_the_sensor_with_every_request_answered(
    served, sample_candidates, sample_parts, test_encounters, kind, says
):
    settings, registry, production, url = served
    base = sample_candidates["logistic_regression"]
    model = Planted(base.model, action="raise") if kind == "raise" else Shifted(base.model, shift=0.3)
    version = register(registry, replace(base, family=f"planted-{kind}", model=model), sample_parts, promote=False)
    registry.start_shadow(version, reason=f"planted {kind} candidate, for the test")
    every_worker_holds(url, version)

    prefix = f"e2e-{kind}"
    requests = [e | {"request_id": f"{prefix}-{i}"} for i, e in enumerate(test_encounters[0][:REQUESTS])]
    if kind == "raise":
        requests = [e | {MARKER_COLUMN: MARKER} for e in requests]
    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda e: httpx.post(f"{url}/predict", json=e, timeout=60), requests))
    assert [a.status_code for a in answers] == [200] * REQUESTS
    assert {a.json()["model_version"] for a in answers} == {production}
    deadline = time.monotonic() + 30
    while read_predictions(settings.prediction_log_url, ["request_id"]).filter(pl.col("request_id").str.starts_with(prefix)).height < REQUESTS:
        assert time.monotonic() < deadline, "the prediction log did not get every request within 30 s"
        time.sleep(0.3)

    result = tick(settings)

    assert registry.rollout() is None and str(registry.production().version) == production
    rows = open_warehouse(settings.warehouse_url).query("SELECT * FROM promotion_decisions WHERE candidate_version = $1", [version])
    assert rows["action"].to_list() == ["rollout_rolled_back"]
    assert says.format(version=version) in rows["reason"][0], rows["reason"][0]
    assert result.asset_events[0].metadata["action"].value == "rollout_rolled_back"
    # The workers let the candidate go; production answers on, and nothing failed meanwhile.
    every_worker_holds(url, None)
    after = [httpx.post(f"{url}/predict", json=e | {"request_id": f"{prefix}-after-{i}"}, timeout=60) for i, e in enumerate(requests[:10])]
    assert [a.status_code for a in after] == [200] * 10 and {a.json()["model_version"] for a in after} == {production}
