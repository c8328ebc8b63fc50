"""serving_bento packs the production model and builds a Bento; `bentoml serve <tag>` serves it with a token and a
PostgreSQL prediction log, and falls back to the packed model when the registry has none."""

from __future__ import annotations

import time

import dagster as dg
import httpx
import pytest

from readmission_platform.defs.resources import MlflowResource, ServingResource
from readmission_platform.defs.serving.assets import serving_bento
from readmission_platform.lib.predictions import read_predictions
from readmission_platform.serving.model import SMOKE_ENCOUNTERS
from readmission_platform.serving.server import running_server
from readmission_platform_tests.serving.conftest import register, registry_of

GOOD = dict(SMOKE_ENCOUNTERS[1])
TOKEN = "s3cret-token"


def materialize_bento(settings) -> dg.ExecuteInProcessResult:
    return dg.materialize(
        [serving_bento],
        resources={
            "mlflow": MlflowResource(
                tracking_uri=settings.mlflow_tracking_uri, artifact_root=settings.mlflow_artifact_root.as_uri()
            ),
            "serving": ServingResource(bentoml_home=str(settings.bentoml_home)),
        },
        raise_on_error=False,
    )


@pytest.fixture(scope="module")
def built(tmp_path_factory, new_home, sample_candidates, sample_parts):
    settings = new_home(tmp_path_factory.mktemp("bento"))
    version = register(registry_of(settings), sample_candidates["hist_gradient_boosting"], sample_parts, promote=True)
    result = materialize_bento(settings)
    assert result.success
    metadata = result.asset_materializations_for_node("serving_bento")[0].metadata
    return settings, version, {k: v.value for k, v in metadata.items()}


def test_the_asset_names_the_bento_and_the_packed_model_version(built):
    settings, version, metadata = built
    assert metadata["model_version"] == version
    assert metadata["bentoml_model"] == f"readmission-classifier:v{version}"
    assert metadata["bento_tag"].startswith("readmission:")
    assert (settings.bentoml_home / "bentos" / "readmission").is_dir()
    assert (settings.bentoml_home / "models" / "readmission-classifier" / f"v{version}").is_dir()
    assert metadata["built"] is True


def test_an_unchanged_production_keeps_its_bento(built):
    settings, version, metadata = built
    again = materialize_bento(settings).asset_materializations_for_node("serving_bento")[0].metadata
    assert again["built"].value is False and again["bento_tag"].value == metadata["bento_tag"]
    assert len([p for p in (settings.bentoml_home / "bentos" / "readmission").iterdir() if p.name != "latest"]) == 1


def test_nothing_promoted_fails_the_asset_with_the_reason(tmp_path, new_home):
    result = materialize_bento(new_home(tmp_path))
    assert not result.success
    failure = result.failure_data_for_node("serving_bento")
    assert "no 'production' version" in failure.user_failure_data.description


@pytest.mark.postgres
def test_the_bento_serves_with_a_token_and_logs_to_postgresql(built, pg_schema_url):
    settings, version, metadata = built
    env = {"READMISSION_API_TOKEN": TOKEN, "READMISSION_PREDICTION_LOG_URL": pg_schema_url}
    with running_server(settings, bento=metadata["bento_tag"], env=env) as url, httpx.Client(base_url=url) as client:
        assert client.post("/predict", json=GOOD).status_code == 401
        wrong = client.post("/predict", json=GOOD, headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401 and "bearer token" in wrong.json()["error"]
        assert client.get("/model").status_code == 401
        assert client.get("/readyz").status_code == 200 and client.get("/metrics").status_code == 200
        auth = {"Authorization": f"Bearer {TOKEN}"}
        answers = [client.post("/predict", json=GOOD | {"request_id": f"pg-{i}"}, headers=auth) for i in range(25)]
        assert {a.status_code for a in answers} == {200} and answers[0].json()["model_version"] == version
        batch = client.post("/predict_batch", json={"encounters": [GOOD] * 5}, headers=auth)
        assert batch.status_code == 200
        assert client.get("/model", headers=auth).json()["version"] == version
        rejected = client.get("/metrics").text
        assert 'readmission_rejected_requests_total{route="/predict",status="401"} 2.0' in rejected
    rows = read_predictions(pg_schema_url).rows(named=True)
    assert len(rows) == 30 and [r["request_id"] for r in rows[:25]] == [f"pg-{i}" for i in range(25)]
    assert {r["model_version"] for r in rows} == {version}


def test_the_bento_serves_its_packed_model_when_the_registry_has_none_and_outlives_a_dead_log(built, tmp_path, new_home):
    settings, version, metadata = built
    elsewhere = new_home(tmp_path)  # an empty MLflow store, the same BentoML store
    env = {
        "BENTOML_HOME": str(settings.bentoml_home),
        "READMISSION_PREDICTION_LOG_URL": "postgresql://nobody@127.0.0.1:9/none",  # nothing listens on port 9
    }
    with running_server(elsewhere, bento=metadata["bento_tag"], env=env) as url:
        answers = [httpx.post(f"{url}/predict", json=GOOD) for _ in range(5)]
        assert {a.status_code for a in answers} == {200} and answers[0].json()["model_version"] == version
        assert httpx.get(f"{url}/model").json()["served_from"] == f"BentoML model readmission-classifier:v{version}"
        deadline = time.monotonic() + 20
        while "readmission_prediction_log_dropped_total 5.0" not in httpx.get(f"{url}/metrics").text:
            assert time.monotonic() < deadline, "the rows the dead log could not take were not counted"
            time.sleep(0.5)
        assert httpx.get(f"{url}/readyz").status_code == 200
