"""Score one encounter in microseconds with a trained pipeline, by tables and trees read off its fitted parts.

`training` pipelines take pandas frames: one row through the ColumnTransformer, the encoders and the calibrated
classifier costs 13-50 ms, and histogram gradient boosting re-encodes its categories and starts threads per call.
A serving request holds one encounter, so `Scorer.compile` turns a fitted pipeline into:

- per categorical column, a table from each value to what the pipeline's own fitted encoders make of it (computed
  once by running those encoders on every value they know, plus one value they do not know, which stands for all
  unknown values as the encoders treat them all alike);
- for trees, the nodes of every fitted tree in flat lists, walked in plain Python; for the linear model, its
  coefficients folded into one log-odds term per category and an affine term per number;
- the fitted sigmoid calibration.

`verify` checks the result against the pipeline's own `predict_proba`; the service refuses a model that fails it.
Many encounters at once (`probabilities`) are looked up by column and scored by the fitted estimator's own code.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import polars as pl
from sklearn.calibration import CalibratedClassifierCV
from sklearn.compose import ColumnTransformer
from sklearn.ensemble import HistGradientBoostingClassifier, RandomForestClassifier
from sklearn.ensemble._hist_gradient_boosting._binning import _map_to_bins
from sklearn.ensemble._hist_gradient_boosting.common import X_BINNED_DTYPE
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import OneHotEncoder, OrdinalEncoder, StandardScaler
from sklearn.utils._openmp_helpers import _openmp_effective_n_threads

from readmission_platform.lib import schema
from readmission_platform.lib.features import CATEGORICAL_FEATURES, FEATURE_COLUMNS, MISSING_CATEGORY, NUMERIC_FEATURES
from readmission_platform.lib.training import predict_probability

# A value no encoder has seen: what it encodes to is what every unknown value encodes to.
UNKNOWN = "\x00unknown"
LINEAR_METHOD = "exact: the model's log-odds terms of each feature, which with the intercept sum to its log-odds"
TREE_METHOD = (
    "occlusion: the change in probability when the feature is withheld, which the trees route as a missing value"
)


class UnsupportedModel(ValueError):
    """The pipeline is not of a shape `Scorer.compile` knows; score it with the pipeline itself."""


def _expit(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


def _domains(encoder: OneHotEncoder | OrdinalEncoder) -> dict[str, list[str]]:
    """Every value a categorical feature may take that the encoder could treat differently, and `UNKNOWN`."""
    domains = {}
    for name, known in zip(CATEGORICAL_FEATURES, encoder.categories_, strict=True):
        values = {str(v) for v in known} | {MISSING_CATEGORY, UNKNOWN}
        column = schema.CLEAN_BY_NAME.get(name)
        if column is not None and column.allowed is not None:
            values |= {str(v) for v in column.allowed}
        if name.endswith("_group"):
            values |= set(schema.ICD9_GROUPS)
        domains[name] = sorted(values - {schema.NOT_TAKEN})
    return domains


def _probe(domains: Mapping[str, list[str]]) -> pd.DataFrame:
    """A frame whose rows walk through every column's domain (cycling the shorter ones); numbers are 0."""
    rows = max(len(values) for values in domains.values())
    frame = {name: [0.0] * rows for name in NUMERIC_FEATURES}
    frame |= {name: [values[i % len(values)] for i in range(rows)] for name, values in domains.items()}
    return pd.DataFrame(frame)[list(FEATURE_COLUMNS)]


def _tables(domains: Mapping[str, list[str]], encoded: np.ndarray, position: Mapping[str, slice]) -> dict[str, dict]:
    """value → the encoded slice of its column, read off the probe's encoded rows."""
    tables: dict[str, dict] = {}
    for name, values in domains.items():
        cols = position[name]
        tables[name] = {value: encoded[i, cols] for i, value in enumerate(values)}
    return tables


@dataclass(frozen=True)
class _Trees:
    """Every tree's nodes in flat lists; leaves point to themselves and carry the value."""

    roots: list[int]
    feature: list[int]  # -1 at a leaf
    threshold: list[float]
    left: list[int]
    right: list[int]
    missing_left: list[bool]
    categories_left: list[frozenset | None]  # a categorical split: the codes that go left
    value: list[float]
    base: float
    mean: bool  # a forest averages its trees; boosting sums them onto `base`

    def raw(self, z: Sequence[float]) -> float:
        feature, threshold, left, right = self.feature, self.threshold, self.left, self.right
        missing_left, categories_left, value = self.missing_left, self.categories_left, self.value
        total = 0.0
        for i in self.roots:
            while (f := feature[i]) >= 0:
                v = z[f]
                if v != v:  # NaN: a missing value or an unknown category
                    i = left[i] if missing_left[i] else right[i]
                elif (cats := categories_left[i]) is not None:
                    i = left[i] if v in cats else right[i]
                else:
                    i = left[i] if v <= threshold[i] else right[i]
            total += value[i]
        return total / len(self.roots) if self.mean else self.base + total


def _boosted_trees(model: HistGradientBoostingClassifier) -> _Trees:
    if model.n_trees_per_iteration_ != 1:
        raise UnsupportedModel("only binary histogram gradient boosting is supported")
    trees = _Trees([], [], [], [], [], [], [], [], float(model._baseline_prediction.ravel()[0]), mean=False)
    for (predictor,) in model._predictors:
        offset = len(trees.feature)
        trees.roots.append(offset)
        bitsets = predictor.raw_left_cat_bitsets
        for i, node in enumerate(predictor.nodes):
            leaf = bool(node["is_leaf"])
            trees.feature.append(-1 if leaf else int(node["feature_idx"]))
            trees.threshold.append(float(node["num_threshold"]))
            trees.left.append(offset + i if leaf else offset + int(node["left"]))
            trees.right.append(offset + i if leaf else offset + int(node["right"]))
            trees.missing_left.append(bool(node["missing_go_to_left"]))
            trees.value.append(float(node["value"]) if leaf else 0.0)
            if not leaf and node["is_categorical"]:
                words = bitsets[node["bitset_idx"]]
                trees.categories_left.append(
                    frozenset(code for code in range(32 * len(words)) if int(words[code >> 5]) >> (code & 31) & 1)
                )
            else:
                trees.categories_left.append(None)
    return trees


def _forest(model: RandomForestClassifier) -> _Trees:
    if list(model.classes_) != [0, 1] or model.n_outputs_ != 1:
        raise UnsupportedModel("only a binary 0/1 random forest is supported")
    trees = _Trees([], [], [], [], [], [], [], [], 0.0, mean=True)
    for estimator in model.estimators_:
        tree = estimator.tree_
        offset = len(trees.feature)
        trees.roots.append(offset)
        fractions = tree.value[:, 0, :] / tree.value[:, 0, :].sum(axis=1, keepdims=True)
        missing_left = getattr(tree, "missing_go_to_left", np.zeros(tree.node_count, dtype=bool))
        for i in range(tree.node_count):
            leaf = tree.children_left[i] == -1
            trees.feature.append(-1 if leaf else int(tree.feature[i]))
            trees.threshold.append(float(tree.threshold[i]))
            trees.left.append(offset + (i if leaf else int(tree.children_left[i])))
            trees.right.append(offset + (i if leaf else int(tree.children_right[i])))
            trees.missing_left.append(bool(missing_left[i]))
            trees.value.append(float(fractions[i, 1]) if leaf else 0.0)
            trees.categories_left.append(None)
    return trees


class _Lookup:
    """A table of value → entry for a whole column at once: values not in it (or null) get the entry of `UNKNOWN`.

    The column is cast to an enumeration of the table's values, whose codes index an array of the entries: 5-6 times
    less CPU than a polars `replace_strict` over 10,000 encounters.
    """

    def __init__(self, table: Mapping[str, float], dtype: type = np.float64) -> None:
        values = [value for value in table if value != UNKNOWN] + [UNKNOWN]
        self.enum = pl.Enum(values)
        self.entries = np.array([table[value] for value in values], dtype=dtype)

    def __call__(self, column: pl.Series) -> np.ndarray:
        codes = column.cast(self.enum, strict=False).to_physical()
        if codes.null_count():  # filling costs more than the rest, so only when something is unknown
            codes = codes.fill_null(len(self.entries) - 1)
        return self.entries[codes.to_numpy()]


class Scorer:
    """The probability of readmission of one encounter's features (`features.record_features`), fast."""

    def __init__(self, model: Pipeline, *, threads: int | None = None) -> None:
        """`threads`: native threads for many encounters at once (default: as scikit-learn would take)."""
        self.threads = threads
        try:
            preprocess, classifier = model.named_steps["preprocess"], model.named_steps["classifier"]
        except (AttributeError, KeyError) as error:
            raise UnsupportedModel("expected a Pipeline with steps 'preprocess' and 'classifier'") from error
        if not (isinstance(preprocess, ColumnTransformer) and isinstance(classifier, CalibratedClassifierCV)):
            raise UnsupportedModel("expected a ColumnTransformer and a CalibratedClassifierCV, as lib/training fits")
        if len(classifier.calibrated_classifiers_) != 1 or classifier.calibrated_classifiers_[0].method != "sigmoid":
            raise UnsupportedModel("expected one sigmoid calibration of a frozen classifier")
        calibrated = classifier.calibrated_classifiers_[0]
        self._a, self._b = float(calibrated.calibrators[0].a_), float(calibrated.calibrators[0].b_)
        estimator = calibrated.estimator
        estimator = getattr(estimator, "estimator", estimator)  # FrozenEstimator
        encoder = preprocess.named_transformers_["categorical"]
        numeric = preprocess.named_transformers_["numeric"]
        blocks = preprocess.output_indices_
        domains = _domains(encoder)
        probe = _probe(domains)
        encoded = preprocess.transform(probe)
        encoded = np.asarray(encoded.toarray() if hasattr(encoded, "toarray") else encoded, dtype=float)
        self.model = model
        self.linear = isinstance(estimator, LogisticRegression)
        self.method = LINEAR_METHOD if self.linear else TREE_METHOD
        if self.linear:
            if not (isinstance(encoder, OneHotEncoder) and isinstance(numeric, StandardScaler)):
                raise UnsupportedModel("expected one-hot categories and standardized numbers before the linear model")
            coef = estimator.coef_.ravel()
            widths = np.asarray(encoder._n_features_outs)
            starts = blocks["categorical"].start + np.concatenate([[0], np.cumsum(widths)[:-1]])
            position = {n: slice(s, s + w) for n, s, w in zip(CATEGORICAL_FEATURES, starts, widths, strict=True)}
            self._terms = {
                name: {value: float(row @ coef[position[name]]) for value, row in table.items()}
                for name, table in _tables(domains, encoded, position).items()
            }
            numeric_coef = coef[blocks["numeric"]]
            scale = numeric_coef / numeric.scale_
            self._numeric = [
                (name, float(s), float(-s * m)) for name, s, m in zip(NUMERIC_FEATURES, scale, numeric.mean_, strict=True)
            ]
            self._intercept = float(estimator.intercept_[0])
            self._term_lookups = {name: _Lookup(table) for name, table in self._terms.items()}
            return
        declared = {name: transformer for name, transformer, _ in preprocess.transformers}
        if not (isinstance(encoder, OrdinalEncoder) and declared.get("numeric") == "passthrough"):
            raise UnsupportedModel("expected ordinal-coded categories and raw numbers before the trees")
        width = blocks["numeric"].stop
        order = np.arange(width)
        # What the pipeline's encoder makes of each value: the classifier's input, for scoring whole frames.
        self._pipeline_codes = {
            name: _Lookup({value: float(code) for value, code in table.items()})
            for name, table in _tables(domains, encoded, {n: blocks["categorical"].start + i for i, n in enumerate(CATEGORICAL_FEATURES)}).items()
        }
        self._classifier = classifier
        self._blocks = blocks
        if isinstance(estimator, HistGradientBoostingClassifier):
            if estimator._preprocessor is not None:
                # Boosting re-codes its categorical columns and moves them first; do the same to the probe.
                encoded = np.asarray(estimator._preprocessor.transform(encoded), dtype=float)
                is_categorical = estimator.is_categorical_
                order = np.concatenate([np.flatnonzero(is_categorical), np.flatnonzero(~is_categorical)])
            self._trees = _boosted_trees(estimator)
            self._boosting = estimator
            self._float32 = False
        elif isinstance(estimator, RandomForestClassifier):
            self._trees = _forest(estimator)
            self._boosting = None
            self._float32 = True  # sklearn trees compare float32 inputs
        else:
            raise UnsupportedModel(f"no fast path for {type(estimator).__name__}")
        # Where each input column lands in the classifier's input.
        landing = np.empty(width, dtype=int)
        landing[order] = np.arange(width)
        categorical_at = {name: int(landing[blocks["categorical"].start + i]) for i, name in enumerate(CATEGORICAL_FEATURES)}
        self._categorical = [
            (name, categorical_at[name], codes := {value: float(code) for value, code in table.items()}, codes[UNKNOWN])
            for name, table in _tables(domains, encoded, categorical_at).items()
        ]
        self._numeric_at = [(name, int(landing[blocks["numeric"].start + i])) for i, name in enumerate(NUMERIC_FEATURES)]
        self._width = width
        if self._boosting is not None:
            # Many encounters go straight to the bins boosting's fit made of its input: a category to its bin by a
            # table, made by boosting's own binning of the category's code; numbers binned by that same routine.
            mapper = self._boosting._bin_mapper
            self._binned_categorical = [
                (name, at, _Lookup(dict(zip(codes, self._bins(at, np.array(list(codes.values()))), strict=True)), X_BINNED_DTYPE))
                for name, at, codes, _ in self._categorical
            ]  # fmt: skip
            self._numeric_columns = [at for _, at in self._numeric_at]
            self._numeric_thresholds = [mapper.bin_thresholds_[at] for at in self._numeric_columns]

    def _bins(self, at: int, values: np.ndarray) -> np.ndarray:
        """The bins boosting's own binning gives `values` as its input column `at`."""
        mapper = self._boosting._bin_mapper
        data = np.zeros((len(values), self._width))
        data[:, at] = values
        binned = np.zeros_like(data, dtype=X_BINNED_DTYPE, order="F")
        _map_to_bins(data, mapper.bin_thresholds_, mapper.is_categorical_, mapper.missing_values_bin_idx_, 1, binned)
        return binned[:, at]

    # -- single encounter -------------------------------------------------------------------------------------------

    def _calibrated(self, response: float) -> float:
        return _expit(-(self._a * response + self._b))

    def _linear_terms(self, features: Mapping[str, float | str]) -> dict[str, float]:
        terms = {}
        for name, table in self._terms.items():
            terms[name] = table.get(features[name], table[UNKNOWN])
        for name, slope, offset in self._numeric:
            terms[name] = slope * features[name] + offset
        return terms

    def _input(self, features: Mapping[str, float | str]) -> list[float]:
        z = [0.0] * self._width
        for name, at, codes, unknown in self._categorical:
            z[at] = codes.get(features[name], unknown)
        for name, at in self._numeric_at:
            value = float(features[name])
            z[at] = float(np.float32(value)) if self._float32 else value
        return z

    def probability(self, features: Mapping[str, float | str]) -> float:
        """The calibrated probability of readmission within 30 days, as the pipeline's predict_proba gives it."""
        if self.linear:
            return self._calibrated(self._intercept + math.fsum(self._linear_terms(features).values()))
        return self._calibrated(self._trees.raw(self._input(features)))

    def contributions(self, features: Mapping[str, float | str]) -> dict[str, float]:
        """Each feature's push on this encounter's risk (see `method`): log-odds terms, or probability changes."""
        if self.linear:
            return self._linear_terms(features)
        base = self.probability(features)
        withheld = {}
        for name in FEATURE_COLUMNS:
            changed = dict(features)
            changed[name] = UNKNOWN if name in CATEGORICAL_FEATURES else float("nan")
            withheld[name] = base - self.probability(changed)
        return withheld

    # -- many encounters ---------------------------------------------------------------------------------------------

    def probabilities(self, frame: pl.DataFrame) -> np.ndarray:
        """The probabilities of every row of a features-table frame: the pipeline's, without its pandas encoding.

        Categories are looked up in the same tables (vectorized by polars). A linear model then sums its terms;
        boosting walks its fitted trees over the bins of the input its own preprocessing would have made, and a
        forest gets the classifier's own predict_proba on the matrix the pipeline would hand it.
        """
        if self.linear:
            logit = np.full(frame.height, self._intercept)
            for name, lookup in self._term_lookups.items():
                logit += lookup(frame[name])
            for name, slope, offset in self._numeric:
                logit += slope * frame[name].to_numpy().astype(float) + offset
            return 1.0 / (1.0 + np.exp(self._a * logit + self._b))
        if self._boosting is not None:
            return self._boosted_probabilities(frame)
        encoded = np.empty((frame.height, self._width))
        start = self._blocks["categorical"].start
        for i, name in enumerate(CATEGORICAL_FEATURES):
            encoded[:, start + i] = self._pipeline_codes[name](frame[name])
        numeric = self._blocks["numeric"]
        for i, name in enumerate(NUMERIC_FEATURES):
            encoded[:, numeric.start + i] = frame[name].to_numpy().astype(float)
        return self._classifier.predict_proba(encoded)[:, 1]

    def _boosted_probabilities(self, frame: pl.DataFrame) -> np.ndarray:
        # The trees walk the bins their fit made of the input boosting's own preprocessing would make (re-coded
        # categories first): a byte per value, with the same splits (a value is at most a threshold exactly when its
        # bin is at most the threshold's bin; an unknown category bins as missing, as the raw walk routes it). The
        # bins come straight from the features, never through the matrix of floats they would be binned from.
        estimator, missing = self._boosting, self._boosting._bin_mapper.missing_values_bin_idx_
        threads = self.threads or _openmp_effective_n_threads()
        binned = np.empty((frame.height, self._width), dtype=X_BINNED_DTYPE, order="F")
        for name, at, lookup in self._binned_categorical:
            binned[:, at] = lookup(frame[name])
        numbers = frame.select(name for name, _ in self._numeric_at).to_numpy().astype(np.float64, copy=False)
        numeric_bins = np.empty(numbers.shape, dtype=X_BINNED_DTYPE, order="F")
        not_categorical = np.zeros(len(self._numeric_columns), dtype=np.uint8)
        _map_to_bins(numbers, self._numeric_thresholds, not_categorical, missing, threads, numeric_bins)
        binned[:, self._numeric_columns] = numeric_bins
        raw = np.full(frame.height, float(np.ravel(estimator._baseline_prediction)[0]))
        for (predictor,) in estimator._predictors:
            raw += predictor.predict_binned(binned, missing, threads)
        return 1.0 / (1.0 + np.exp(self._a * raw + self._b))

    # -- checks -----------------------------------------------------------------------------------------------------

    def verify(self, frame: pl.DataFrame, *, tolerance: float = 1e-9) -> float:
        """The largest difference from the pipeline's own probabilities over a features-table frame; raises past it."""
        expected = predict_probability(self.model, frame)
        one_by_one = np.array([self.probability(row) for row in frame.select(FEATURE_COLUMNS).iter_rows(named=True)])
        got = np.concatenate([one_by_one, self.probabilities(frame)])
        worst = float(np.max(np.abs(np.tile(expected, 2) - got))) if len(got) else 0.0
        if not worst <= tolerance:
            raise UnsupportedModel(
                f"the fast path differs from the pipeline by up to {worst:.3g} over {len(got)} rows (tolerance "
                f"{tolerance:g}); score with the pipeline itself"
            )
        return worst
