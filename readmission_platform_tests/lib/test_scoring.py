import math

import numpy as np
import polars as pl
import pytest
from sklearn.dummy import DummyClassifier
from sklearn.pipeline import Pipeline

from readmission_platform.lib.features import CATEGORICAL_FEATURES, FEATURE_COLUMNS, NUMERIC_FEATURES
from readmission_platform.lib.scoring import UNKNOWN, Scorer, UnsupportedModel
from readmission_platform.lib.training import FAMILIES, LOGISTIC_REGRESSION, predict_probability


@pytest.fixture(scope="module")
def rows(full_features) -> pl.DataFrame:
    """3,000 test-split encounters outside the training sample, plus 300 with unknown or missing values."""
    test = full_features.slice(20_000).filter(pl.col("split") == "test").head(3_000)
    odd = test.head(300).with_columns(
        pl.lit("Astrology").alias("medical_specialty"),
        pl.lit("ZZ").alias("payer_code"),
        pl.lit("missing").alias("race"),
        pl.when(pl.int_range(300) % 2 == 0).then(pl.lit("never seen")).otherwise(pl.col("A1Cresult")).alias("A1Cresult"),
    )
    return pl.concat([test, odd])


@pytest.mark.parametrize("family", FAMILIES)
def test_fast_path_equals_the_pipeline_for_every_family(family, sample_candidates, rows):
    scorer = Scorer(sample_candidates[family].model)
    assert scorer.verify(rows, tolerance=1e-12) <= 1e-12


def test_linear_contributions_are_the_exact_log_odds_terms(sample_candidates, rows):
    scorer = Scorer(sample_candidates[LOGISTIC_REGRESSION].model)
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
    scorer = Scorer(model)
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


def test_a_pipeline_of_another_shape_is_refused_by_name(sample_candidates, sample_parts):
    model = Pipeline([("preprocess", sample_candidates[LOGISTIC_REGRESSION].model[0]), ("classifier", DummyClassifier())])
    with pytest.raises(UnsupportedModel, match="CalibratedClassifierCV"):
        Scorer(model)


def test_verify_refuses_a_fast_path_that_disagrees(sample_candidates, rows):
    scorer = Scorer(sample_candidates[LOGISTIC_REGRESSION].model)
    scorer._intercept += 0.01
    with pytest.raises(UnsupportedModel, match="differs from the pipeline"):
        scorer.verify(rows.head(20))


def test_numbers_keep_their_float_values(sample_candidates, rows):
    features = rows.select(FEATURE_COLUMNS).row(0, named=True)
    assert all(isinstance(features[name], float) for name in NUMERIC_FEATURES)
    assert np.isfinite(Scorer(sample_candidates["random_forest"].model).probability(features))
