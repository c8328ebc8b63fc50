import dataclasses

import numpy as np
import polars as pl
import pytest
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import FunctionTransformer

from readmission_platform.lib import metrics
from readmission_platform.lib.features import CATEGORICAL_FEATURES, FEATURE_COLUMNS
from readmission_platform.lib.training import (
    FAMILIES,
    KNOWN_FAMILIES,
    LIGHTGBM,
    LOGISTIC_REGRESSION,
    PARAM_GRIDS,
    _output_columns,
    choose_challenger,
    feature_importances,
    labels,
    model_input,
    predict_probability,
    train_candidates,
)


@pytest.fixture(scope="module")
def sample(sample_parts) -> dict[str, pl.DataFrame]:
    return sample_parts


@pytest.fixture(scope="module")
def candidates(sample_candidates):
    return [sample_candidates[family] for family in KNOWN_FAMILIES]


def test_each_family_searches_its_whole_grid_and_keeps_the_best_setting(candidates):
    assert [c.family for c in candidates] == list(KNOWN_FAMILIES)
    for candidate in candidates:
        tried = candidate.grid
        assert [t["params"] for t in tried] == list(PARAM_GRIDS[candidate.family])
        best = max(tried, key=lambda t: (t["roc_auc"], t["pr_auc"]))
        assert candidate.params == best["params"]
        # The sigmoid recalibration is monotone: it leaves the ranking chosen on validation as it was.
        assert candidate.validation["roc_auc"] == pytest.approx(best["roc_auc"], abs=1e-3)
        assert candidate.fit_seconds >= sum(t["fit_seconds"] for t in tried)


def test_each_family_predicts_probabilities_that_rank_test_patients(candidates, sample):
    test = sample["test"]
    for candidate in candidates:
        probability = predict_probability(candidate.model, test)

        assert probability.shape == (test.height,)
        assert ((probability >= 0) & (probability <= 1)).all()
        assert metrics.ranking(labels(test), probability)["roc_auc"] > 0.6, candidate.family


def test_the_models_read_exactly_the_feature_columns(candidates):
    for candidate in candidates:
        assert list(candidate.model.feature_names_in_) == list(FEATURE_COLUMNS)


def test_identifiers_and_labels_given_to_a_model_are_ignored(candidates, sample):
    test = sample["test"]
    plain = model_input(test)
    # The label itself among the columns: a model that read it would predict differently.
    with_extras = plain.assign(
        encounter_id=test["encounter_id"].to_numpy(),
        patient_nbr=test["patient_nbr"].to_numpy(),
        readmitted_30d=labels(test),
    )[["encounter_id", "patient_nbr", "readmitted_30d", *reversed(FEATURE_COLUMNS)]]
    for candidate in candidates:
        # Not bit for bit: the forest adds its trees' votes in whatever order its two threads finish.
        difference = candidate.model.predict_proba(with_extras) - candidate.model.predict_proba(plain)
        assert np.abs(difference).max() < 1e-12, candidate.family


def test_a_missing_feature_column_is_an_error(candidates, sample):
    with pytest.raises(ValueError, match=r"lacks feature columns \['payer_code'\]"):
        model_input(sample["test"].drop("payer_code"))
    with pytest.raises(ValueError, match="payer_code"):
        candidates[0].model.predict_proba(model_input(sample["test"]).drop(columns="payer_code"))


def test_calibrated_candidates_beat_the_base_rate_and_flag_a_plausible_share(candidates):
    for candidate in candidates:
        validation = candidate.validation
        assert validation["brier"] < validation["base_rate_brier"], candidate.family
        assert validation["mean_predicted"] == pytest.approx(validation["observed_rate"], abs=0.01)
        assert 0 < candidate.threshold < 1
        assert 0.05 < validation["positive_rate"] < 0.8


def test_challenger_has_the_best_validation_roc_auc_and_pr_auc_breaks_ties(candidates):
    def scored(candidate, roc_auc, pr_auc):
        return dataclasses.replace(candidate, validation=candidate.validation | {"roc_auc": roc_auc, "pr_auc": pr_auc})

    first, second, third = candidates[:3]
    by_roc_auc = [scored(first, 0.60, 0.30), scored(second, 0.66, 0.20), scored(third, 0.65, 0.40)]
    tied = [scored(first, 0.66, 0.20), scored(second, 0.66, 0.21)]

    assert choose_challenger(by_roc_auc).family == second.family
    assert choose_challenger(tied).family == second.family
    with pytest.raises(ValueError, match="no candidates"):
        choose_challenger([])


def test_unknown_family_is_named(sample):
    with pytest.raises(ValueError, match=r"unknown model families \['xgboost'\]"):
        train_candidates(sample["train"], sample["validation"], families=("xgboost",))


def test_feature_importances_name_each_feature_and_credit_the_informative_ones(sample_candidates, sample):
    validation = sample["validation"]
    constant = [name for name in FEATURE_COLUMNS if validation[name].n_unique() == 1]
    assert constant, "expected some medication column to be constant in the sample's validation rows"
    for candidate in (sample_candidates[family] for family in FAMILIES):  # the families retraining fits
        importances = feature_importances(candidate.model, validation, rows=2_000, repeats=2)
        by_feature = dict(importances.select("feature", "importance").iter_rows())

        assert sorted(by_feature) == sorted(FEATURE_COLUMNS)
        assert importances["importance"].is_sorted(descending=True)
        assert all(by_feature[name] == 0 for name in constant), candidate.family
        assert "discharge_disposition_id" in importances["feature"].head(3).to_list(), candidate.family


def test_importances_from_encoded_columns_are_those_of_shuffling_the_feature_columns(sample_candidates, sample):
    for family in (LOGISTIC_REGRESSION, LIGHTGBM):  # one-hot and scaled columns; ordinal codes and raw values
        model = sample_candidates[family].model
        # An identity step in front: the pipeline predicts the same, but its encoding is no longer known column by
        # column, so its importances come from shuffling the feature columns and encoding every copy.
        opaque = Pipeline([("same", FunctionTransformer()), *model.steps])
        assert _output_columns(model) is not None and _output_columns(opaque) is None
        found, expected = (feature_importances(m, sample["validation"], rows=500, repeats=2) for m in (model, opaque))
        assert found["feature"].to_list() == expected["feature"].to_list(), family
        assert found["importance"].to_numpy() == pytest.approx(expected["importance"].to_numpy(), abs=1e-12), family


def test_lightgbm_is_calibrated_on_its_log_odds_and_predicts_on_one_thread(sample_candidates, sample):
    candidate = sample_candidates[LIGHTGBM]
    calibrated = candidate.model[-1].calibrated_classifiers_[0]
    booster = calibrated.estimator.estimator
    x = candidate.model[0].transform(model_input(sample["test"]))
    raw = booster.booster_.predict(x, raw_score=True)
    a, b = calibrated.calibrators[0].a_, calibrated.calibrators[0].b_
    # The sigmoid takes the raw score (log-odds), not LightGBM's probability: affine in log-odds, so SHAP stays exact.
    assert predict_probability(candidate.model, sample["test"]) == pytest.approx(1 / (1 + np.exp(a * raw + b)), abs=1e-12)
    assert booster.get_params()["n_jobs"] == 1
    # Native categorical splits (a set of codes goes left) on the ordinal codes, and only on them.
    splits = booster.booster_.trees_to_dataframe().dropna(subset=["split_feature"])
    categorical = splits[splits["decision_type"] == "=="]
    assert len(categorical) and set(categorical["split_feature"]) <= {f"Column_{i}" for i in range(len(CATEGORICAL_FEATURES))}


def test_the_search_stops_at_its_time_box_after_the_first_setting(sample):
    grid = ({"num_leaves": 7, "n_estimators": 20}, {"num_leaves": 15, "n_estimators": 20}, {"num_leaves": 31, "n_estimators": 20})
    (candidate,) = train_candidates(
        sample["train"], sample["validation"], families=(LIGHTGBM,), grids={LIGHTGBM: grid}, search_seconds=0.0
    )
    first, *rest = candidate.grid
    assert first["params"] == grid[0] and candidate.params == first["params"] and "roc_auc" in first
    assert rest and all(t["skipped"] == "past the 0 s time box" and "roc_auc" not in t for t in rest)


def test_retraining_fits_the_linear_model_and_lightgbm_unless_asked_for_another_known_family():
    assert FAMILIES == (LOGISTIC_REGRESSION, LIGHTGBM) and set(FAMILIES) < set(KNOWN_FAMILIES)
