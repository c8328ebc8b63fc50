import copy

import pytest

from readmission_platform.serving.model import ModelRefused, serve


def info(candidate) -> dict:
    return {"name": "m", "version": "9", "threshold": candidate.threshold, "base_rate": 0.11}


def test_a_model_that_passes_the_smoke_test_serves_with_its_fast_path(sample_candidates):
    model = serve(sample_candidates["hist_gradient_boosting"].model, info(sample_candidates["hist_gradient_boosting"]))
    assert model.scorer is not None and model.smoke_test() <= 1e-9
    assert model.risk_band(model.threshold) == "high" and model.risk_band(0.11) == "low"
    assert model.risk_band(0.111) == ("medium" if 0.111 < model.threshold else "high")


def test_a_model_whose_probabilities_are_not_numbers_is_refused(sample_candidates):
    broken = copy.deepcopy(sample_candidates["logistic_regression"].model)
    broken[-1].calibrated_classifiers_[0].calibrators[0].a_ = float("nan")
    with pytest.raises(ModelRefused, match="version 9 fails the smoke test"):
        serve(broken, info(sample_candidates["logistic_regression"]))
    with pytest.raises(ModelRefused, match=r"expected numbers in \[0, 1\]"):
        serve(broken, info(sample_candidates["logistic_regression"]), fast=False)
