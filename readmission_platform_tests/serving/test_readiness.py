"""A service started before anything is promoted: alive, not ready, saying why; ready once a version is promoted."""

import time

import httpx

from readmission_platform.serving.model import SMOKE_ENCOUNTERS
from readmission_platform.serving.server import running_server
from readmission_platform_tests.serving.conftest import break_artifacts, register, registry_of


def test_not_ready_until_a_version_is_promoted_then_ready_without_a_restart(tmp_path, new_home, sample_candidates, sample_parts):
    settings = new_home(tmp_path)
    registry = registry_of(settings)
    env = {"READMISSION_RELOAD_SECONDS": "1", "BENTOML_HOME": str(tmp_path / "no-bentoml")}
    with running_server(settings, bento=None, env=env, wait_for="/livez") as url, httpx.Client(base_url=url) as client:
        assert client.get("/readyz").status_code == 503
        for answer in (client.post("/predict", json=SMOKE_ENCOUNTERS[0]), client.get("/model")):
            assert answer.status_code == 503 and "nothing is promoted to 'production'" in answer.json()["error"]
        # A promoted version that does not load: the answers say so, not that nothing is promoted.
        broken = register(registry, sample_candidates["logistic_regression"], sample_parts, promote=False)
        break_artifacts(registry, broken)
        registry.promote(broken, reason="a version whose stored model is damaged")
        deadline = time.monotonic() + 30
        while "nothing is promoted" in (error := client.get("/model").json()["error"]):
            assert time.monotonic() < deadline, "the service never tried the promoted version"
            time.sleep(0.3)
        assert error.startswith(f"no model loaded: version {broken} is promoted to 'production' but did not load"), error
        answer = client.post("/predict", json=SMOKE_ENCOUNTERS[0])
        assert answer.status_code == 503 and answer.json()["error"] == error
        assert client.get("/readyz").status_code == 503
        version = register(registry, sample_candidates["logistic_regression"], sample_parts, promote=True)
        deadline = time.monotonic() + 30
        while client.get("/readyz").status_code != 200:
            assert time.monotonic() < deadline, "the service never became ready"
            time.sleep(0.3)
        answer = client.post("/predict", json=SMOKE_ENCOUNTERS[0])
        assert answer.status_code == 200 and answer.json()["model_version"] == version
