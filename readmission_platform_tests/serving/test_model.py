import copy
import logging

import numpy as np
import pytest

from readmission_platform.lib.features import FEATURE_COLUMNS
from readmission_platform.lib.training import predict_probability
from readmission_platform.serving.model import ModelRefused, serve


def info(candidate) -> dict:
    return {"name": "m", "version": "9", "threshold": candidate.threshold, "base_rate": 0.11}


def test_a_model_that_passes_the_smoke_test_serves_with_its_fast_path(sample_candidates):
    model = serve(sample_candidates["hist_gradient_boosting"].model, info(sample_candidates["hist_gradient_boosting"]))
    assert model.scorer is not None and model.smoke_test() <= 1e-9
    assert model.risk_band(model.threshold) == "high" and model.risk_band(0.11) == "low"
    assert model.risk_band(0.111) == ("medium" if 0.111 < model.threshold else "high")
    edges = np.concatenate([np.linspace(0, 1, 1001), [model.threshold, model.base_rate, np.nextafter(model.threshold, 0)]])
    assert [model.risk_band(float(p)) for p in edges] == list(model.risk_bands(edges))  # one at a time as many at once


def test_a_model_whose_probabilities_are_not_numbers_is_refused(sample_candidates):
    broken = copy.deepcopy(sample_candidates["logistic_regression"].model)
    broken[-1].calibrated_classifiers_[0].calibrators[0].a_ = float("nan")
    with pytest.raises(ModelRefused, match="version 9 fails the smoke test"):
        serve(broken, info(sample_candidates["logistic_regression"]))
    with pytest.raises(ModelRefused, match=r"expected numbers in \[0, 1\]"):
        serve(broken, info(sample_candidates["logistic_regression"]), fast=False)


def test_a_fast_path_that_fails_its_pin_falls_back_to_the_pipeline_and_says_so(sample_candidates, sample_parts, caplog):
    candidate = sample_candidates["logistic_regression"]
    pipeline = copy.deepcopy(candidate.model)
    # The scaler then no longer centres the numbers, while the linear fast path reads its fitted mean_ all the same.
    pipeline[0].named_transformers_["numeric"].with_mean = False
    with caplog.at_level(logging.WARNING, logger="readmission_platform.serving.model"):
        model = serve(pipeline, info(candidate))
    assert model.scorer is None
    assert "version 9 has no fast path (the fast path fails its pin" in caplog.text
    rows = sample_parts["test"].head(50)
    assert np.array_equal(model.probabilities(rows), predict_probability(pipeline, rows))
    assert model.probability(rows.select(FEATURE_COLUMNS).row(0, named=True)) == predict_probability(pipeline, rows)[0]
    assert not np.allclose(predict_probability(pipeline, rows), predict_probability(candidate.model, rows))


@pytest.mark.parametrize("fast", [True, False])
def test_no_rows_to_score_are_no_probabilities_with_or_without_a_fast_path(sample_candidates, sample_parts, fast):
    # A batch whose every encounter is out of scope, or routed to a canary, leaves production nothing to score.
    candidate = sample_candidates["lightgbm"]
    model = serve(candidate.model, info(candidate), fast=fast)
    assert (model.scorer is not None) == fast
    assert model.probabilities(sample_parts["test"].head(0)).shape == (0,)
