"""Shadow and canary in a real `bentoml serve .` with two workers: the rollout set directly in a real MLflow store,
answers and the prediction log checked request by request (`make rollout`: a few minutes, so not in `make test`)."""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import replace

import httpx
import numpy as np
import polars as pl
import pytest

from readmission_platform.lib.cleaning import clean_record
from readmission_platform.lib.features import record_features
from readmission_platform.lib.predictions import read_predictions
from readmission_platform.lib.registry import CANARY, ROLLOUT_SHARE, SHADOW
from readmission_platform.lib.routing import to_canary
from readmission_platform.lib.training import predict_probability
from readmission_platform.serving.model import SMOKE_ENCOUNTERS
from readmission_platform.serving.server import running_server
from readmission_platform_tests.serving.conftest import break_artifacts, register, registry_of
from readmission_platform_tests.serving.planted import MARKER, MARKER_COLUMN, Planted

pytestmark = pytest.mark.rollout

GOOD = dict(SMOKE_ENCOUNTERS[0])
TIMEOUT_MS = 200


class Rollout:
    """A served production version, and a way to put any registered version behind `shadow` or `canary`."""

    def __init__(self, settings, candidates, parts):
        self.settings = settings
        self.registry = registry_of(settings)
        self.candidates, self.parts = candidates, parts
        self.production = register(self.registry, candidates["hist_gradient_boosting"], parts, promote=True)
        self._stack = ExitStack()
        env = {"READMISSION_RELOAD_SECONDS": "1", "READMISSION_SERVE_WORKERS": "2",
               "READMISSION_CANDIDATE_TIMEOUT_MS": str(TIMEOUT_MS)}  # fmt: skip
        self.url = self._stack.enter_context(running_server(settings, bento=None, env=env, ready_within=300))
        self.client = httpx.Client(base_url=self.url, timeout=60)

    def set(self, stage: str | None, version: str | None = None, share: float = 0.0) -> None:
        """Put `version` behind `stage` (None: no candidate), with the canary's share, as rollout-control would."""
        client, name = self.registry.client, self.registry.model_name
        for alias in (SHADOW, CANARY):
            if alias != stage and alias in client.get_registered_model(name).aliases:
                client.delete_registered_model_alias(name, alias)
        client.set_registered_model_tag(name, ROLLOUT_SHARE, str(share) if stage == CANARY else "0")
        if stage is not None:
            client.set_registered_model_alias(name, stage, version)

    def every_worker(self, holds: Callable[[dict], bool], within: float = 60.0) -> None:
        """Wait until `/model` on fresh connections (either worker) satisfies `holds` 8 times running."""
        deadline = time.monotonic() + within
        while not all(holds(httpx.get(f"{self.url}/model", timeout=30).json()) for _ in range(8)):
            assert time.monotonic() < deadline, httpx.get(f"{self.url}/model").json().get("candidate")
            time.sleep(0.5)

    def logged(self, prefix: str, count: int, within: float = 20.0) -> pl.DataFrame:
        """The log's rows whose request_id starts with `prefix`, once there are `count` of them."""
        deadline = time.monotonic() + within
        while True:
            rows = read_predictions(self.settings.prediction_log_url).filter(pl.col("request_id").str.starts_with(prefix))
            if rows.height >= count or time.monotonic() > deadline:
                return rows
            time.sleep(0.3)

    def metric(self, name: str, **labels: str) -> float:
        wanted = [f'{k}="{v}"' for k, v in labels.items()]
        return sum(float(line.rsplit(" ", 1)[1]) for line in self.client.get("/metrics").text.splitlines()
                   if line.startswith(name) and all(w in line for w in wanted))  # fmt: skip

    def stop(self) -> None:
        self.client.close()
        self._stack.close()


@pytest.fixture(scope="module")
def rollout(tmp_path_factory, new_home, sample_candidates, sample_parts):
    started = Rollout(new_home(tmp_path_factory.mktemp("rollout")), sample_candidates, sample_parts)
    yield started
    started.stop()


def encounters(test_encounters, prefix: str, count: int) -> list[dict]:
    return [e | {"request_id": f"{prefix}-{i}"} for i, e in enumerate(test_encounters[0][:count])]


def test_a_shadow_scores_beside_production_and_its_answers_are_logged_never_returned(rollout, test_encounters):
    candidate = rollout.candidates["logistic_regression"]
    shadow = register(rollout.registry, candidate, rollout.parts, promote=False)
    rollout.set(SHADOW, shadow)
    rollout.every_worker(lambda m: (m["candidate"] or {}).get("version") == shadow and m["candidate"]["loaded"])
    info = rollout.client.get("/model").json()
    assert info["version"] == rollout.production and info["stage"] == "production"
    assert info["candidate"]["stage"] == SHADOW and info["candidate"]["family"] == "logistic_regression"
    singles = encounters(test_encounters, "shadow-one", 60)
    for encounter in singles:
        answer = rollout.client.post("/predict", json=encounter).json()
        assert (answer["model_version"], answer["stage"]) == (rollout.production, "production"), answer
    batch = encounters(test_encounters, "shadow-batch", 500)
    answered = rollout.client.post("/predict_batch", json={"encounters": batch}).json()
    assert {(p["model_version"], p["stage"]) for p in answered["predictions"]} == {(rollout.production, "production")}

    rows = rollout.logged("shadow-", 560)
    assert rows.height == 560
    assert set(rows["model_version"]) == {rollout.production} and set(rows["stage"]) == {"production"}
    assert set(rows["shadow_version"]) == {shadow} and rows["candidate_error"].null_count() == 560
    assert rows["candidate_ms"].min() > 0
    # The shadow's logged probability is the candidate pipeline's own for the same encounter.
    by_id = {e["request_id"]: e for e in singles + batch}
    features = pl.DataFrame([record_features(clean_record({k: v for k, v in by_id[r].items() if k != "request_id"}))
                             for r in rows["request_id"]])  # fmt: skip
    expected = predict_probability(candidate.model, features)
    np.testing.assert_allclose(rows["shadow_probability"].to_numpy(), expected, atol=1e-9)
    assert not np.allclose(rows["shadow_probability"].to_numpy(), rows["probability"].to_numpy())
    rollout.shadow = shadow


def test_a_canary_answers_exactly_the_requests_whose_id_hashes_below_its_share(rollout, test_encounters):
    share = 0.3
    rollout.set(CANARY, rollout.shadow, share)
    rollout.every_worker(lambda m: (m["candidate"] or {}).get("stage") == CANARY and m["candidate"]["share"] == share)
    singles = encounters(test_encounters, "canary-one", 300)
    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda e: httpx.post(f"{rollout.url}/predict", json=e, timeout=60), singles))
    assert {a.status_code for a in answers} == {200}
    routed = [to_canary(e["request_id"], share) for e in singles]
    assert [a.json()["stage"] == CANARY for a in answers] == routed
    assert [a.json()["model_version"] for a in answers] == [rollout.shadow if r else rollout.production for r in routed]
    assert abs(sum(routed) / len(routed) - share) < 0.1
    # The same request id lands on the same side again, whichever worker answers.
    again = [rollout.client.post("/predict", json=e).json()["stage"] == CANARY for e in singles[:40]]
    assert again == routed[:40]
    # A batch is routed encounter by encounter, by each one's request_id.
    batch = encounters(test_encounters, "canary-batch", 400)
    items = rollout.client.post("/predict_batch", json={"encounters": batch}).json()["predictions"]
    assert [i["stage"] == CANARY for i in items] == [to_canary(e["request_id"], share) for e in batch]
    rows = rollout.logged("canary-", 740)
    assert rows.height == 740
    assert (rows["stage"] == CANARY).to_list() == [to_canary(r, share) for r in rows["request_id"]]
    canary_rows = rows.filter(pl.col("stage") == CANARY)
    assert set(canary_rows["model_version"]) == {rollout.shadow} and canary_rows["candidate_ms"].min() > 0
    assert rows["shadow_version"].null_count() == 740 and rows["candidate_error"].null_count() == 740


def planted(rollout, action: str) -> str:
    base = rollout.candidates["logistic_regression"]
    bad = replace(base, family=f"planted-{action}", model=Planted(base.model, action=action, seconds=1.0))
    return register(rollout.registry, bad, rollout.parts, promote=False)


@pytest.mark.parametrize(
    ("stage", "kind", "cause", "says"),
    [(CANARY, "raise", "raised", "raised ValueError: planted failure"),
     (SHADOW, "sleep", "slow", f"slower than {TIMEOUT_MS} ms"),
     (CANARY, "broken", "load", "did not load: ")],
)  # fmt: skip
def test_a_candidate_that_raises_is_slow_or_does_not_load_never_fails_a_request(rollout, test_encounters, stage, kind, cause, says):
    if kind == "broken":
        version = register(rollout.registry, rollout.candidates["logistic_regression"], rollout.parts, promote=False)
        break_artifacts(rollout.registry, version)
    else:
        version = planted(rollout, kind)
    rollout.set(stage, version, 1.0)
    rollout.every_worker(lambda m: (m["candidate"] or {}).get("version") == version and m["candidate"]["loaded"] == (kind != "broken"))
    failed_before = rollout.metric("readmission_candidate_failures_total", model_version=version, cause=cause)
    prefix = f"bad-{kind}"
    marked = [e | {MARKER_COLUMN: MARKER} for e in encounters(test_encounters, prefix, 40)]
    started = time.monotonic()
    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda e: httpx.post(f"{rollout.url}/predict", json=e, timeout=60), marked))
    elapsed = time.monotonic() - started
    batch = encounters(test_encounters, f"{prefix}-batch", 100)
    batch[7][MARKER_COLUMN] = MARKER
    answers.append(rollout.client.post("/predict_batch", json={"encounters": batch}))
    assert [a.status_code for a in answers] == [200] * 41
    assert {(a.json()["model_version"], a.json()["stage"]) for a in answers[:40]} == {(rollout.production, "production")}
    assert {(p["model_version"], p["stage"]) for p in answers[40].json()["predictions"]} == {(rollout.production, "production")}
    if kind == "sleep":  # a request waits for the shadow at most its budget, and not at all while it is stuck
        assert elapsed < 40 * TIMEOUT_MS / 1000 / 2, elapsed
    rows = rollout.logged(prefix, 140)
    assert rows.height == 140 and set(rows["stage"]) == {"production"}
    assert rows["candidate_error"].null_count() == 0 and all(e.startswith(says) for e in rows["candidate_error"]), set(rows["candidate_error"])
    assert rows["shadow_probability"].null_count() == 140
    assert set(rows["shadow_version"].drop_nulls()) == ({version} if stage == SHADOW else set())
    # Counted per request, by cause; the worker's log warns once per cause.
    assert rollout.metric("readmission_candidate_failures_total", model_version=version, cause=cause) >= failed_before + 41
    rollout.set(None)
    rollout.every_worker(lambda m: m["candidate"] is None)
