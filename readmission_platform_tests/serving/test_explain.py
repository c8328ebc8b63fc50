"""Exact explanations through a real `bentoml serve .`: for each family the candidates fit, /explain's base value and
contributions sum to the log-odds of the probability /predict answers; and /model carries the version's model card."""

from __future__ import annotations

import math
import time
from contextlib import ExitStack

import httpx
import pytest

from readmission_platform.lib.evaluation import evaluate_model, subgroup_tables
from readmission_platform.lib.features import FEATURE_COLUMNS, HISTORY, field_of
from readmission_platform.lib.model_card import build_card, log_card
from readmission_platform.lib.training import FAMILIES, LIGHTGBM, predict_probability
from readmission_platform.serving.server import running_server
from readmission_platform_tests.serving.conftest import register, registry_of


@pytest.fixture(scope="module")
def served(tmp_path_factory, new_home, sample_candidates, sample_parts):
    """A server whose production version is LightGBM, with its model card; the test of each family promotes it."""
    settings = new_home(tmp_path_factory.mktemp("explain"))
    registry = registry_of(settings)
    versions = {family: register(registry, sample_candidates[family], sample_parts, promote=False) for family in FAMILIES}
    test = sample_parts["test"]
    candidate = sample_candidates[LIGHTGBM]
    card = build_card(
        version=versions[LIGHTGBM], family=LIGHTGBM, threshold=candidate.threshold, params=candidate.params,
        lineage=registry.version(versions[LIGHTGBM]).tags, validation=candidate.validation, test=test,
        probability=predict_probability(candidate.model, test), subgroups=subgroup_tables(candidate.model, test, threshold=candidate.threshold),
        test_metrics=evaluate_model(candidate.model, test, threshold=candidate.threshold, prevalence=0.11), resamples=50,
    )  # fmt: skip
    log_card(registry.client, registry.version(versions[LIGHTGBM]).run_id, card)
    registry.promote(versions[LIGHTGBM], reason="test: explain LightGBM")
    with ExitStack() as stack:
        url = stack.enter_context(running_server(settings, bento=None, env={"READMISSION_RELOAD_SECONDS": "1"}))
        client = stack.enter_context(httpx.Client(base_url=url, timeout=60))
        yield client, registry, versions, card


def serving(client: httpx.Client, registry, version: str) -> None:
    """Promote `version` unless it is production already, and wait until the server answers with it."""
    if str(registry.production().version) != version:
        registry.promote(version, reason=f"test: explain version {version}")
    deadline = time.monotonic() + 60
    while client.get("/model").json().get("version") != version:
        assert time.monotonic() < deadline, f"version {version} never came to serve"
        time.sleep(0.3)


@pytest.mark.parametrize("family", FAMILIES)
def test_explanations_add_up_to_the_log_odds_of_the_answered_probability(family, served, test_encounters):
    client, registry, versions, _ = served
    serving(client, registry, versions[family])
    worst = 0.0
    for encounter in test_encounters[0][:40]:
        answer = client.post("/explain", json=encounter).json()
        probability = client.post("/predict", json=encounter).json()["probability"]
        assert answer["probability"] == probability and answer["exact"] and answer["unit"] == "log-odds"
        assert answer["log_odds"] == pytest.approx(math.log(probability / (1 - probability)), abs=1e-12)
        terms = [c["contribution"] for c in answer["contributions"]]
        assert len(terms) == len(FEATURE_COLUMNS) and terms == sorted(terms, key=abs, reverse=True)
        worst = max(worst, abs(answer["base_value"] + math.fsum(terms) - answer["log_odds"]))
        fields = {f["field"]: f for f in answer["fields"]}
        # Each field is the sum of its features, and every feature is in exactly the field it belongs to.
        by_feature = {c["feature"]: c["contribution"] for c in answer["contributions"]}
        assert sorted(n for f in fields.values() for n in f["features"]) == sorted(FEATURE_COLUMNS)
        for name, field in fields.items():
            assert all(field_of(n) == name for n in field["features"])
            assert field["contribution"] == pytest.approx(math.fsum(by_feature[n] for n in field["features"]), abs=1e-12)
        assert {"diag_1", "age", "visits_in_prior_year", "insulin"} <= set(fields)
        assert (HISTORY in fields) == any(field_of(n) == HISTORY for n in FEATURE_COLUMNS)
    assert worst < 1e-9
    assert "exact" in client.get("/model").json()["explain_method"]


def test_the_model_route_carries_the_version_model_card(served):
    client, registry, versions, card = served
    serving(client, registry, versions[LIGHTGBM])
    served_card = client.get("/model").json()["model_card"]
    assert served_card == card and served_card["family"] == LIGHTGBM
    assert {"roc_auc", "brier"} <= set(served_card["test_metrics"]) and served_card["calibration"]["deciles"]
