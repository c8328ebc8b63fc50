"""What every fast scorer reads off a fitted pipeline through public interfaces: its parts, the sigmoid calibration,
and what its fitted encoders make of every value a categorical feature may take."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import polars as pl
from sklearn.calibration import CalibratedClassifierCV
from sklearn.compose import ColumnTransformer
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import OneHotEncoder, OrdinalEncoder

from readmission_platform.lib import schema
from readmission_platform.lib.features import CATEGORICAL_FEATURES, FEATURE_COLUMNS, MISSING_CATEGORY, NUMERIC_FEATURES
from readmission_platform.lib.training import model_input

# A value no encoder has seen: what it encodes to is what every unknown value encodes to.
UNKNOWN = "\x00unknown"


@dataclass(frozen=True)
class Attribution:
    """Each feature's push on one encounter's risk (`terms`); when exact, they sum with `base` to the log-odds of the
    probability served, and `base` is None when they do not add up (occlusion, in probability)."""

    terms: Mapping[str, float]
    base: float | None

    def log_odds(self, probability: float) -> float:
        """log(p / (1 - p)) of the probability served. Past log-odds of about ±37 p is 0 or 1 in floating point:
        then the model's own log-odds when exact (`base` plus the terms, of which p is the sigmoid), else those of
        the nearest probability inside (0, 1)."""
        if 0.0 < probability < 1.0:
            return math.log(probability / (1.0 - probability))
        if self.base is not None:
            return self.base + math.fsum(self.terms.values())
        inside = min(max(probability, math.nextafter(0.0, 1.0)), math.nextafter(1.0, 0.0))
        return math.log(inside / (1.0 - inside))


class UnsupportedModel(ValueError):
    """The pipeline has no fast path (its shape is not one `compile` knows, or the path fails its pin)."""


def expit(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


@dataclass(frozen=True)
class Parts:
    """A `lib/training` pipeline taken apart: preprocessing, encoders, the frozen estimator and its sigmoid."""

    preprocess: ColumnTransformer
    encoder: Any  # the fitted transformer of the categorical columns
    numeric: Any  # the fitted transformer of the numeric columns, or "passthrough"
    estimator: Any
    a: float
    b: float

    def calibrated(self, response: np.ndarray | float) -> np.ndarray | float:
        """The sigmoid calibration of the estimator's response (log-odds, or a forest's probability)."""
        if isinstance(response, float):
            return expit(-(self.a * response + self.b))
        return self.calibrated_as_arrays(response)

    def calibrated_as_arrays(self, response: np.ndarray | float) -> np.ndarray | float:
        """`calibrated` of an array; one number through it gets the bits it would get in an array (a batch)."""
        return 1.0 / (1.0 + np.exp(self.a * response + self.b))

    @property
    def blocks(self) -> dict[str, slice]:
        """Where each transformer's columns land in the estimator's input (ColumnTransformer.output_indices_)."""
        return self.preprocess.output_indices_


def parts(pipeline: Pipeline) -> Parts:
    """The parts of a pipeline as `lib/training` fits it; `UnsupportedModel` naming what differs."""
    try:
        preprocess, classifier = pipeline.named_steps["preprocess"], pipeline.named_steps["classifier"]
    except (AttributeError, KeyError) as error:
        raise UnsupportedModel("expected a Pipeline with steps 'preprocess' and 'classifier'") from error
    if not (isinstance(preprocess, ColumnTransformer) and isinstance(classifier, CalibratedClassifierCV)):
        raise UnsupportedModel("expected a ColumnTransformer and a CalibratedClassifierCV, as lib/training fits")
    if len(classifier.calibrated_classifiers_) != 1 or classifier.calibrated_classifiers_[0].method != "sigmoid":
        raise UnsupportedModel("expected one sigmoid calibration of a frozen classifier")
    calibrated = classifier.calibrated_classifiers_[0]
    try:
        (sigmoid,) = calibrated.calibrators
        a, b = float(sigmoid.a_), float(sigmoid.b_)
    except (AttributeError, ValueError) as error:
        raise UnsupportedModel(f"expected one fitted sigmoid (a_, b_) in the calibration: {error!r}") from error
    estimator = calibrated.estimator
    declared = {name: transformer for name, transformer, _ in preprocess.transformers}
    return Parts(
        preprocess=preprocess,
        encoder=preprocess.named_transformers_["categorical"],
        numeric=preprocess.named_transformers_["numeric"] if declared.get("numeric") != "passthrough" else "passthrough",
        estimator=getattr(estimator, "estimator", estimator),  # FrozenEstimator
        a=a,
        b=b,
    )


def domains(encoder: OneHotEncoder | OrdinalEncoder) -> dict[str, list[str]]:
    """Every value a categorical feature may take that the encoder could treat differently, and `UNKNOWN`."""
    found = {}
    for name, known in zip(CATEGORICAL_FEATURES, encoder.categories_, strict=True):
        values = {str(v) for v in known} | {MISSING_CATEGORY, UNKNOWN}
        column = schema.CLEAN_BY_NAME.get(name)
        if column is not None and column.allowed is not None:
            values |= {str(v) for v in column.allowed}
        if name.endswith("_group"):
            values |= set(schema.ICD9_GROUPS)
        found[name] = sorted(values - {schema.NOT_TAKEN})
    return found


def probe(values: Mapping[str, list[str]]) -> pl.DataFrame:
    """A features frame whose rows walk through every column's domain (cycling the shorter ones); numbers are 0."""
    rows = max(len(v) for v in values.values())
    frame = {name: [0.0] * rows for name in NUMERIC_FEATURES}
    frame |= {name: [v[i % len(v)] for i in range(rows)] for name, v in values.items()}
    return pl.DataFrame(frame).select(FEATURE_COLUMNS)


def encode(preprocess: ColumnTransformer, frame: pl.DataFrame) -> np.ndarray:
    """The pipeline's own preprocessing of a features frame, as a dense float array."""
    encoded = preprocess.transform(model_input(frame))
    return np.asarray(encoded.toarray() if hasattr(encoded, "toarray") else encoded, dtype=float)


def tables(values: Mapping[str, list[str]], encoded: np.ndarray, position: Mapping[str, Any]) -> dict[str, dict]:
    """value → the encoded slice (or column) of its feature, read off the probe's encoded rows."""
    return {name: {value: encoded[i, position[name]] for i, value in enumerate(v)} for name, v in values.items()}


class Lookup:
    """A table of value → entry for a whole column at once: values not in it (or null) get the entry of `UNKNOWN`.

    The column is cast to an enumeration of the table's values, whose codes index an array of the entries, which
    costs less than a polars `replace_strict`.
    """

    def __init__(self, table: Mapping[str, float]) -> None:
        values = [value for value in table if value != UNKNOWN] + [UNKNOWN]
        self.enum = pl.Enum(values)
        self.entries = np.array([table[value] for value in values], dtype=np.float64)

    def __call__(self, column: pl.Series) -> np.ndarray:
        codes = column.cast(self.enum, strict=False).to_physical()
        if codes.null_count():  # filling costs more than the rest, so only when something is unknown
            codes = codes.fill_null(len(self.entries) - 1)
        return self.entries[codes.to_numpy()]
