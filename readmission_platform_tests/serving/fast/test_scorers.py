import math

import numpy as np
import polars as pl
import pytest
from sklearn.dummy import DummyClassifier
from sklearn.pipeline import Pipeline

from readmission_platform.lib.features import CATEGORICAL_FEATURES, FEATURE_COLUMNS, NUMERIC_FEATURES
from readmission_platform.lib.training import KNOWN_FAMILIES, LIGHTGBM, LOGISTIC_REGRESSION, predict_probability
from readmission_platform.serving.fast import UNKNOWN, UnsupportedModel, compile, pin


def with_odd_values(test: pl.DataFrame) -> pl.DataFrame:
    """The rows, then the first 300 again with unknown or missing values."""
    odd = test.head(300).with_columns(
        pl.lit("Astrology").alias("medical_specialty"),
        pl.lit("ZZ").alias("payer_code"),
        pl.lit("missing").alias("race"),
        pl.when(pl.int_range(300) % 2 == 0).then(pl.lit("never seen")).otherwise(pl.col("A1Cresult")).alias("A1Cresult"),
    )
    return pl.concat([test, odd])


@pytest.fixture(scope="module")
def rows(full_features) -> pl.DataFrame:
    """3,000 test-split encounters outside the training sample, plus 300 with unknown or missing values."""
    return with_odd_values(full_features.slice(20_000).filter(pl.col("split") == "test").head(3_000))


@pytest.fixture(scope="module")
def test_set(full_features) -> pl.DataFrame:
    """Every test-split encounter of the data set, plus 300 with unknown or missing values."""
    return with_odd_values(full_features.filter(pl.col("split") == "test"))


@pytest.mark.parametrize("family", KNOWN_FAMILIES)
def test_fast_path_equals_the_pipeline_for_every_family(family, sample_candidates, test_set):
    model = sample_candidates[family].model
    scorer = compile(model)
    assert pin(scorer, model, test_set, tolerance=1e-12) <= 1e-12


@pytest.mark.parametrize("family", [f for f in KNOWN_FAMILIES if f != LOGISTIC_REGRESSION])
def test_one_tree_encounter_at_a_time_gives_the_batchs_probabilities_to_the_bit(family, sample_candidates, test_set):
    # /predict and /predict_batch answer an encounter with the same number: a single row takes its own walk.
    scorer = compile(sample_candidates[family].model)
    one_by_one = [scorer.probability(row) for row in test_set.select(FEATURE_COLUMNS).iter_rows(named=True)]
    assert one_by_one == scorer.probabilities(test_set).tolist()


def test_linear_contributions_are_the_exact_log_odds_terms(sample_candidates, rows):
    scorer = compile(sample_candidates[LOGISTIC_REGRESSION].model)
    calibrated = sample_candidates[LOGISTIC_REGRESSION].model[-1].calibrated_classifiers_[0]
    a, b = calibrated.calibrators[0].a_, calibrated.calibrators[0].b_
    logistic = calibrated.estimator.estimator
    for features in rows.select(FEATURE_COLUMNS).head(50).iter_rows(named=True):
        terms = scorer.contributions(features)
        assert set(terms) == set(FEATURE_COLUMNS)
        log_odds = logistic.intercept_[0] + sum(terms.values())
        assert scorer.probability(features) == pytest.approx(1 / (1 + math.exp(a * log_odds + b)), abs=1e-12)
    assert "exact" in scorer.method


@pytest.mark.parametrize("family", ["hist_gradient_boosting", "random_forest"])
def test_tree_contributions_are_the_change_when_a_feature_is_withheld(family, sample_candidates, rows):
    model = sample_candidates[family].model
    scorer = compile(model)
    features = rows.select(FEATURE_COLUMNS).row(7, named=True)
    contributions = scorer.contributions(features)
    for name in ("diag_1_group", "number_inpatient", "age_years", "insulin"):
        withheld = pl.DataFrame([features]).with_columns(
            pl.lit(UNKNOWN if name in CATEGORICAL_FEATURES else None).cast(pl.String if name in CATEGORICAL_FEATURES else pl.Float64).alias(name)
        )
        expected = scorer.probability(features) - predict_probability(model, withheld)[0]
        assert contributions[name] == pytest.approx(expected, abs=1e-12)
    assert any(abs(c) > 1e-4 for c in contributions.values())
    assert "occlusion" in scorer.method


@pytest.mark.parametrize("family", [LOGISTIC_REGRESSION, LIGHTGBM])
def test_exact_explanations_sum_with_their_base_value_to_the_log_odds_of_the_probability(family, sample_candidates, test_set):
    scorer = compile(sample_candidates[family].model)
    assert "exact" in scorer.method
    worst = 0.0
    for features in test_set.select(FEATURE_COLUMNS).tail(500).iter_rows(named=True):  # unknown and missing values too
        attribution = scorer.explain(features)
        assert set(attribution.terms) == set(FEATURE_COLUMNS) and attribution.base is not None
        probability = scorer.probability(features)
        worst = max(worst, abs(attribution.base + math.fsum(attribution.terms.values()) - math.log(probability / (1 - probability))))
    assert worst < 1e-9


def test_where_the_probability_rounds_to_one_the_log_odds_are_the_models_own_and_finite(sample_candidates, rows):
    scorer = compile(sample_candidates[LOGISTIC_REGRESSION].model)
    counts = {"number_inpatient": 365.0, "number_emergency": 365.0, "number_outpatient": 365.0, "prior_visits": 1095.0,
              "history_prior_encounters": 1000.0, "history_prior_inpatient_days": 10_000.0}  # fmt: skip
    features = rows.select(FEATURE_COLUMNS).row(0, named=True) | counts  # far past anything the model saw
    attribution = scorer.explain(features)

    assert scorer.probability(features) == 1.0
    log_odds = attribution.log_odds(1.0)
    assert log_odds == attribution.base + math.fsum(attribution.terms.values()) and 37 < log_odds < math.inf
    assert attribution.log_odds(0.5) == 0.0
    occlusion = type(attribution)(terms=attribution.terms, base=None)
    assert occlusion.log_odds(1.0) == pytest.approx(36.7, abs=0.1) and occlusion.log_odds(0.0) < -700


def test_lightgbm_terms_are_its_own_shap_values_scaled_by_the_calibration(sample_candidates, rows):
    model = sample_candidates[LIGHTGBM].model
    calibrated = model[-1].calibrated_classifiers_[0]
    a = calibrated.calibrators[0].a_
    features = rows.select(FEATURE_COLUMNS).row(3, named=True)
    encoded = model[0].transform(pl.DataFrame([features]).to_pandas())
    shap = calibrated.estimator.estimator.booster_.predict(encoded, pred_contrib=True)[0]
    terms = compile(model).explain(features).terms
    # The first columns the trees see are the categories, in CATEGORICAL_FEATURES order, then the numbers.
    order = [*CATEGORICAL_FEATURES, *NUMERIC_FEATURES]
    assert [terms[name] for name in order] == pytest.approx(list(-a * shap[:-1]), abs=1e-12)
    assert sum(abs(shap[:-1]) > 1e-6) > 5  # more than a handful of features move this encounter


def test_occlusion_does_not_claim_to_add_up(sample_candidates, rows):
    attribution = compile(sample_candidates["hist_gradient_boosting"].model).explain(rows.select(FEATURE_COLUMNS).row(0, named=True))
    assert attribution.base is None and set(attribution.terms) == set(FEATURE_COLUMNS)


def test_a_pipeline_of_another_shape_is_refused_by_name(sample_candidates, sample_parts):
    model = Pipeline([("preprocess", sample_candidates[LOGISTIC_REGRESSION].model[0]), ("classifier", DummyClassifier())])
    with pytest.raises(UnsupportedModel, match="CalibratedClassifierCV"):
        compile(model)


def test_the_pin_refuses_a_fast_path_that_disagrees(sample_candidates, rows):
    model = sample_candidates[LOGISTIC_REGRESSION].model
    scorer = compile(model)
    scorer.intercept += 0.01
    with pytest.raises(UnsupportedModel, match="differs from the pipeline"):
        pin(scorer, model, rows.head(20))


def test_numbers_keep_their_float_values(sample_candidates, rows):
    features = rows.select(FEATURE_COLUMNS).row(0, named=True)
    assert all(isinstance(features[name], float) for name in NUMERIC_FEATURES)
    assert np.isfinite(compile(sample_candidates["random_forest"].model).probability(features))


def test_threads_that_share_a_batch_give_the_same_probabilities(sample_candidates, test_set):
    model = sample_candidates["hist_gradient_boosting"].model
    assert np.array_equal(compile(model, threads=3).probabilities(test_set), compile(model).probabilities(test_set))


@pytest.mark.parametrize("family", ["hist_gradient_boosting", "random_forest", LIGHTGBM])
def test_the_walk_gives_treelites_own_prediction_of_every_tree(family, sample_candidates, rows):
    # The trees' records (preorder, categorical tables, the side of a missing value) against treelite's reference
    # predictor on the same imported model, before any calibration.
    from treelite import gtil

    from readmission_platform.serving.fast.trees import _import

    scorer = compile(sample_candidates[family].model)
    model, response_class = _import(scorer._parts.estimator)
    features = rows.select(FEATURE_COLUMNS).with_columns(  # missing numbers too
        pl.when(pl.int_range(pl.len()) % 7 == 0).then(None).otherwise(pl.col("num_lab_procedures")).alias("num_lab_procedures")
    )
    x = np.array([scorer._row(row) for row in features.iter_rows(named=True)])
    if family == "random_forest":  # scikit-learn's trees compare float32 inputs
        x = x.astype(np.float32).astype(np.float64)
    walked = scorer._forest.responses(x, np.empty(len(x)))
    reference = gtil.predict(model, x, pred_margin=True).reshape(len(x), -1)[:, response_class]
    assert np.isnan(x).any() and walked == pytest.approx(reference, rel=1e-12, abs=1e-12)
