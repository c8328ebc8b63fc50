"""The logistic regression's fast path: its coefficients folded into one log-odds term per category and an affine
term per number, read through `coef_`, `intercept_`, the scaler's `mean_`/`scale_` and the encoder's `transform`."""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import polars as pl
from sklearn.preprocessing import OneHotEncoder, StandardScaler

from readmission_platform.lib.features import CATEGORICAL_FEATURES, NUMERIC_FEATURES
from readmission_platform.serving.fast.encoding import UNKNOWN, Attribution, Lookup, Parts, UnsupportedModel, domains, encode, probe, tables

METHOD = (
    "exact: the linear model's log-odds term of each feature, after calibration, which with `base_value` sum to the "
    "log-odds of the probability"
)


def _positions(encoder: OneHotEncoder, start: int) -> dict[str, slice]:
    """Where each categorical feature's one-hot columns are, from the encoder's output names (`<feature>_<value>`),
    which come feature by feature in input order."""
    names = list(encoder.get_feature_names_out(CATEGORICAL_FEATURES))
    positions, at = {}, 0
    for name in CATEGORICAL_FEATURES:
        width = 0
        while at + width < len(names) and names[at + width].startswith(f"{name}_"):
            width += 1
        positions[name] = slice(start + at, start + at + width)
        at += width
    if at != len(names):
        raise UnsupportedModel(f"the one-hot encoder's output names {names[at:at + 3]}… follow no feature in order")
    return positions


class LinearScorer:
    """Log-odds terms per category and per number, summed and calibrated."""

    method = METHOD

    def __init__(self, parts: Parts) -> None:
        estimator, encoder, numeric = parts.estimator, parts.encoder, parts.numeric
        if not (isinstance(encoder, OneHotEncoder) and isinstance(numeric, StandardScaler)):
            raise UnsupportedModel("expected one-hot categories and standardized numbers before the linear model")
        self._parts = parts
        blocks = parts.blocks
        coef = estimator.coef_.ravel()
        values = domains(encoder)
        position = _positions(encoder, blocks["categorical"].start)
        self.terms = {
            name: {value: float(row @ coef[position[name]]) for value, row in table.items()}
            for name, table in tables(values, encode(parts.preprocess, probe(values)), position).items()
        }
        scale = coef[blocks["numeric"]] / numeric.scale_
        self._numeric = [
            (name, float(s), float(-s * m)) for name, s, m in zip(NUMERIC_FEATURES, scale, numeric.mean_, strict=True)
        ]
        self.intercept = float(estimator.intercept_[0])
        self._lookups = {name: Lookup(table) for name, table in self.terms.items()}

    def contributions(self, features: Mapping[str, float | str]) -> dict[str, float]:
        """Each feature's log-odds term: with the intercept, they sum to the model's log-odds."""
        found = {name: table.get(features[name], table[UNKNOWN]) for name, table in self.terms.items()}
        for name, slope, offset in self._numeric:
            found[name] = slope * features[name] + offset
        return found

    def explain(self, features: Mapping[str, float | str]) -> Attribution:
        """The terms in the calibrated log-odds, -(a * log-odds + b): each scaled by -a, the rest in the base value."""
        a, b = self._parts.a, self._parts.b
        terms = {name: -a * term for name, term in self.contributions(features).items()}
        return Attribution(terms=terms, base=-(a * self.intercept + b))

    def probability(self, features: Mapping[str, float | str]) -> float:
        return self._parts.calibrated(self.intercept + math.fsum(self.contributions(features).values()))

    def probabilities(self, frame: pl.DataFrame) -> np.ndarray:
        logit = np.full(frame.height, self.intercept)
        for name, lookup in self._lookups.items():
            logit += lookup(frame[name])
        for name, slope, offset in self._numeric:
            logit += slope * frame[name].to_numpy().astype(float) + offset
        return self._parts.calibrated(logit)
