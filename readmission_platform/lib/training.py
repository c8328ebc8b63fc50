"""Candidate models for 30-day readmission: model families, a small time-boxed grid each, chosen on the validation split.

Every model is a scikit-learn Pipeline from a pandas frame of `features.FEATURE_COLUMNS` to a probability.
Its ColumnTransformer selects those columns by name: a missing one raises, extra ones (identifiers, labels)
are ignored and cannot reach the classifier.

Imbalance (11 % positives) is handled by class weights, which improve the ranking a little but inflate
the probabilities (validation Brier 0.18-0.23 against 0.10 for predicting the base rate). Each
family's best model is therefore recalibrated with a sigmoid fitted on the validation split. The sigmoid is
monotone, so validation ROC-AUC and PR-AUC, and thus the choice of settings and of the challenger, are the
same before and after it; validation Brier is in-sample for its two parameters, test Brier is not. The sigmoid
takes each model's log-odds (LightGBM's raw score, the linear model's decision function), so it is affine in them and
an exact split of the log-odds (`serving/fast`) stays exact after calibration.

The candidates retraining fits (`FAMILIES`) are the logistic regression and LightGBM: LightGBM ranks better than
HistGradientBoosting, which had won before, on the same test patients, and the random forest never won and cost the
most of the search, so those two are no longer tried by default (benchmarks/README.md, Training). They stay known (`KNOWN_FAMILIES`), so a
version of them registered earlier still serves and a run may ask for them by name.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import pandas as pd
import polars as pl
from lightgbm import LGBMClassifier
from sklearn.calibration import CalibratedClassifierCV
from sklearn.compose import ColumnTransformer
from sklearn.ensemble import HistGradientBoostingClassifier, RandomForestClassifier
from sklearn.frozen import FrozenEstimator
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import FunctionTransformer, OneHotEncoder, OrdinalEncoder, StandardScaler

from readmission_platform.lib import metrics, schema
from readmission_platform.lib.features import CATEGORICAL_FEATURES, FEATURE_COLUMNS, NUMERIC_FEATURES

LOGISTIC_REGRESSION = "logistic_regression"
HIST_GRADIENT_BOOSTING = "hist_gradient_boosting"
RANDOM_FOREST = "random_forest"
LIGHTGBM = "lightgbm"
KNOWN_FAMILIES = (LOGISTIC_REGRESSION, LIGHTGBM, HIST_GRADIENT_BOOSTING, RANDOM_FOREST)
FAMILIES = (LOGISTIC_REGRESSION, LIGHTGBM)  # what retraining fits unless told otherwise

# Small on purpose: tuning moves validation ROC-AUC by less than its noise here (benchmarks/bench_search.py sets the
# grid beside an Optuna search of the same time). The families retraining fits get one setting each, the one that did
# best on validation with the history features among those measured (benchmarks/README.md, Training): another
# setting cost a whole fit for a difference of 0.001-0.002.
PARAM_GRIDS: dict[str, tuple[dict, ...]] = {
    LOGISTIC_REGRESSION: ({"C": 0.01},),
    LIGHTGBM: ({"num_leaves": 31, "n_estimators": 200},),
    HIST_GRADIENT_BOOSTING: (
        {"learning_rate": 0.05, "max_leaf_nodes": 15},
        {"learning_rate": 0.05, "max_leaf_nodes": 31},
        {"learning_rate": 0.1, "max_leaf_nodes": 15},
    ),
    RANDOM_FOREST: ({"min_samples_leaf": 20}, {"min_samples_leaf": 50}),
}
# Categories seen fewer times in training are pooled into one 'infrequent' category.
MIN_CATEGORY_COUNT = 20
# A family's search stops trying further settings once it has taken this long (the first setting is always fitted).
SEARCH_SECONDS = 60.0


class LightGBMClassifier(LGBMClassifier):
    """LightGBM's classifier whose `decision_function` is its raw score, the log-odds, which the sigmoid calibration
    then takes (without it, scikit-learn would calibrate the probability, and no log-odds split would stay exact)."""

    def decision_function(self, X) -> np.ndarray:  # noqa: N803 (scikit-learn's name)
        return self.predict(X, raw_score=True)


@dataclass(frozen=True)
class Candidate:
    """The best setting of one family: its calibrated pipeline, validation metrics and the grid behind it."""

    family: str
    params: dict
    model: Pipeline
    threshold: float  # maximises validation F1
    validation: dict[str, float]  # metrics.evaluate of the calibrated probabilities at `threshold`
    fit_seconds: float  # the whole family: encoding, every setting, calibration
    grid: tuple[dict, ...]  # every setting tried: params, roc_auc, pr_auc, fit_seconds; untried ones past the time box


def model_input(frame: pl.DataFrame) -> pd.DataFrame:
    """The feature columns of a features-table frame, in the pandas form the pipelines take."""
    missing = [name for name in FEATURE_COLUMNS if name not in frame.columns]
    if missing:
        raise ValueError(f"the frame lacks feature columns {missing}; expected every column of FEATURE_COLUMNS")
    return frame.select(FEATURE_COLUMNS).to_pandas()


def labels(frame: pl.DataFrame) -> np.ndarray:
    """The target `readmitted_30d` as 0/1."""
    target = frame.get_column(schema.LABEL_30D)
    if target.null_count():
        raise ValueError(f"'{schema.LABEL_30D}' is null in {target.null_count()} rows; every row needs a label")
    return target.cast(pl.Int8).to_numpy()


def predict_probability(model: Pipeline, frame: pl.DataFrame) -> np.ndarray:
    """Probability of readmission within 30 days for every row of a features-table frame."""
    return model.predict_proba(model_input(frame))[:, 1]


def _preprocessor(family: str) -> ColumnTransformer:
    if family == LOGISTIC_REGRESSION:
        encoder = OneHotEncoder(handle_unknown="infrequent_if_exist", min_frequency=MIN_CATEGORY_COUNT)
        numeric = StandardScaler()
    else:
        # Trees split integer codes directly (LightGBM and HistGradientBoosting as categories); one-hot columns made
        # the forest several times slower for no real gain.
        encoder = OrdinalEncoder(
            handle_unknown="use_encoded_value", unknown_value=np.nan, min_frequency=MIN_CATEGORY_COUNT
        )
        numeric = "passthrough"
    # Categorical columns come first, so they are the first len(CATEGORICAL_FEATURES) columns of the output.
    return ColumnTransformer(
        [("categorical", encoder, list(CATEGORICAL_FEATURES)), ("numeric", numeric, list(NUMERIC_FEATURES))]
    )


def _classifier(family: str, params: dict, seed: int):
    if family == LOGISTIC_REGRESSION:
        return LogisticRegression(class_weight="balanced", solver="newton-cholesky", **params)
    if family == HIST_GRADIENT_BOOSTING:
        return HistGradientBoostingClassifier(
            class_weight="balanced",
            categorical_features=list(range(len(CATEGORICAL_FEATURES))),
            max_iter=300,
            early_stopping=True,
            l2_regularization=1.0,
            random_state=seed,
            **params,
        )
    if family == RANDOM_FOREST:
        return RandomForestClassifier(
            class_weight="balanced_subsample",
            n_estimators=150,
            max_samples=0.5,
            max_features="sqrt",
            n_jobs=2,
            random_state=seed,
            **params,
        )
    if family == LIGHTGBM:
        # No class weights: the sigmoid fixes the level anyway, and they cost ranking here.
        defaults = {
            "objective": "binary", "learning_rate": 0.05, "min_child_samples": 50, "subsample": 0.8, "subsample_freq": 1,
            "colsample_bytree": 0.8, "reg_lambda": 1.0, "cat_smooth": 10.0, "min_data_per_group": 50,
            # One thread, in training too: on the shared two cores, two OpenMP threads spinning against other work
            # made a fit many times slower (benchmarks/README.md, Training); served beside other work, one thread.
            "n_jobs": 1, "random_state": seed, "verbose": -1,
        }  # fmt: skip
        return LightGBMClassifier(**(defaults | params))
    raise ValueError(f"unknown model family '{family}'; expected one of {', '.join(KNOWN_FAMILIES)}")


def _fit(family: str, classifier, x: np.ndarray, y: np.ndarray):
    if family != LIGHTGBM:
        return classifier.fit(x, y)
    return classifier.fit(x, y, categorical_feature=list(range(len(CATEGORICAL_FEATURES))))


def _train_family(
    family: str, grid: tuple[dict, ...], train: pl.DataFrame, validation: pl.DataFrame, seed: int, search_seconds: float
) -> Candidate:
    started = time.perf_counter()
    y_train, y_validation = labels(train), labels(validation)
    # The preprocessing does not depend on the grid, so it is fitted once per family.
    preprocessor = _preprocessor(family)
    encoded_train = preprocessor.fit_transform(model_input(train))
    encoded_validation = preprocessor.transform(model_input(validation))
    tried, fitted = [], []
    for params in grid:
        if fitted and time.perf_counter() - started > search_seconds:
            tried.append({"params": params, "skipped": f"past the {search_seconds:g} s time box"})
            continue
        setting_started = time.perf_counter()
        classifier = _fit(family, _classifier(family, params, seed), encoded_train, y_train)
        fit_seconds = time.perf_counter() - setting_started
        probability = classifier.predict_proba(encoded_validation)[:, 1]
        fitted.append(classifier)
        tried.append({"params": params, **metrics.ranking(y_validation, probability), "fit_seconds": fit_seconds})
    best = max(range(len(fitted)), key=lambda i: (tried[i]["roc_auc"], tried[i]["pr_auc"]))
    calibrated = CalibratedClassifierCV(FrozenEstimator(fitted[best]), method="sigmoid")
    calibrated.fit(encoded_validation, y_validation)
    probability = calibrated.predict_proba(encoded_validation)[:, 1]
    threshold = metrics.choose_threshold(y_validation, probability)
    return Candidate(
        family=family,
        params=grid[best],
        model=Pipeline([("preprocess", preprocessor), ("classifier", calibrated)]),
        threshold=threshold,
        validation=metrics.evaluate(y_validation, probability, threshold=threshold, prevalence=float(y_train.mean())),
        fit_seconds=time.perf_counter() - started,
        grid=tuple(tried),
    )


def train_candidates(
    train: pl.DataFrame,
    validation: pl.DataFrame,
    *,
    families: tuple[str, ...] = FAMILIES,
    grids: dict[str, tuple[dict, ...]] = PARAM_GRIDS,
    seed: int = 0,
    search_seconds: float = SEARCH_SECONDS,
) -> list[Candidate]:
    """Fit the settings of each family on `train` (until the family has taken `search_seconds`), keep the best by
    validation ROC-AUC (PR-AUC on ties)."""
    unknown = set(families) - set(KNOWN_FAMILIES)
    if unknown:
        raise ValueError(f"unknown model families {sorted(unknown)}; expected some of {', '.join(KNOWN_FAMILIES)}")
    return [_train_family(family, tuple(grids[family]), train, validation, seed, search_seconds) for family in families]


def choose_challenger(candidates: list[Candidate]) -> Candidate:
    """The candidate with the best validation ROC-AUC, PR-AUC breaking ties."""
    if not candidates:
        raise ValueError("no candidates to choose from; train at least one model family first")
    return max(candidates, key=lambda c: (c.validation["roc_auc"], c.validation["pr_auc"]))


def _output_columns(model: Pipeline) -> list[np.ndarray] | None:
    """For a pipeline of a ColumnTransformer whose every output column is made from one input column (one-hot columns,
    ordinal codes, scaled or passed-through values) and a classifier: the output columns of each of FEATURE_COLUMNS.
    None for any other pipeline."""
    if len(model) != 2 or not isinstance(model[0], ColumnTransformer):
        return None
    preprocess, inputs = model[0], {}
    for name, transformer, columns in preprocess.transformers_:
        if transformer == "drop":
            continue
        # A fitted "passthrough" is an identity FunctionTransformer.
        identity = isinstance(transformer, FunctionTransformer) and transformer.func is None
        if not (identity or isinstance(transformer, OneHotEncoder | OrdinalEncoder | StandardScaler)):
            return None
        inputs[name] = (list(columns), isinstance(transformer, OneHotEncoder))
    # Output columns are named `transformer__feature`, a one-hot one `transformer__feature_category`.
    owners = []
    for output in preprocess.get_feature_names_out():
        name, _, rest = output.partition("__")
        columns, one_hot = inputs.get(name, ((), False))
        matches = [c for c in columns if rest == c or (one_hot and rest.startswith(f"{c}_"))]
        if not matches:
            return None
        owners.append(max(matches, key=len))
    owners = np.array(owners)
    return [np.flatnonzero(owners == name) for name in FEATURE_COLUMNS]


def feature_importances(
    model: Pipeline, frame: pl.DataFrame, *, rows: int = 2_000, repeats: int = 3, seed: int = 0
) -> pl.DataFrame:
    """Drop in ROC-AUC when one feature column is shuffled, on at most `rows` rows of `frame` (validation rows).

    Permutation treats every family alike and names the original feature columns. All shuffled copies of a
    repeat go through the model in one call: sklearn's permutation_importance, a call per feature, took 2-8 times
    as long here. Where each of the pipeline's encoded columns comes from one feature column (`_output_columns`),
    the rows are encoded once and a feature's encoded columns are shuffled instead, which is the same thing: encoding
    the copies cost most of the time of the linear model's importances.
    """
    rng = np.random.default_rng(seed)
    sample = frame[np.sort(rng.permutation(frame.height)[:rows])]
    x, y = model_input(sample), labels(sample)
    baseline = metrics.ranking(y, model.predict_proba(x)[:, 1])["roc_auc"]
    output_columns = _output_columns(model)
    encoded = None if output_columns is None else model[0].transform(x)
    if not isinstance(encoded, np.ndarray):
        encoded = None  # no encoding known column by column, or a sparse one: shuffle the feature columns themselves
    else:
        # A copy of the encoded rows per feature, made once: each repeat overwrites the same columns of each copy.
        copies = np.broadcast_to(encoded, (len(FEATURE_COLUMNS), *encoded.shape)).copy()
    drops = np.empty((len(FEATURE_COLUMNS), repeats))
    for repeat in range(repeats):
        if encoded is None:
            shuffled = pd.concat(
                [x.assign(**{name: x[name].to_numpy()[rng.permutation(len(x))]}) for name in FEATURE_COLUMNS],
                ignore_index=True,
            )
            probability = model.predict_proba(shuffled)[:, 1]
        else:
            for copy, columns in zip(copies, output_columns, strict=True):
                copy[:, columns] = encoded[np.ix_(rng.permutation(len(x)), columns)]
            probability = model[-1].predict_proba(copies.reshape(-1, encoded.shape[1]))[:, 1]
        probability = probability.reshape(len(FEATURE_COLUMNS), len(x))
        drops[:, repeat] = [baseline - metrics.ranking(y, p)["roc_auc"] for p in probability]
    return pl.DataFrame(
        {"feature": FEATURE_COLUMNS, "importance": drops.mean(axis=1), "std": drops.std(axis=1)}
    ).sort(["importance", "feature"], descending=[True, False])
