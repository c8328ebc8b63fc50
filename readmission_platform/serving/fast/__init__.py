"""Score encounters in microseconds with a trained pipeline, behind one interface, `FastScorer`.

`training` pipelines take pandas frames: one row through the ColumnTransformer, the encoders and the calibrated
classifier costs milliseconds. `compile` turns a fitted pipeline into a scorer that reads only public interfaces:
the fitted encoders' `transform` (run once on every value they could treat differently, so each value becomes a
table entry), the linear model's `coef_` and `intercept_`, the trees as treelite imports them (LightGBM's too), and the sigmoid
calibration's `a_` and `b_`. Each scorer is then pinned to the pipeline's own `predict_proba`; one that does not
agree raises `UnsupportedModel`, as a pipeline of an unknown shape does, and the service scores that version through
the pipeline itself. The batch decoder of `/predict_batch` lives beside it (`decode.decode_batch`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

import numpy as np
import polars as pl
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline

from readmission_platform.lib.features import FEATURE_COLUMNS
from readmission_platform.lib.training import predict_probability
from readmission_platform.serving.fast.encoding import UNKNOWN, Attribution, UnsupportedModel, domains, parts, probe
from readmission_platform.serving.fast.linear import LinearScorer
from readmission_platform.serving.fast.trees import TreeScorer

__all__ = ["UNKNOWN", "Attribution", "FastScorer", "UnsupportedModel", "compile", "pin"]


class FastScorer(Protocol):
    """The probability of readmission of encounters' features (`features.record_features`, a features frame)."""

    method: str  # how `contributions` are computed, and their unit

    def probability(self, features: Mapping[str, float | str]) -> float:
        """One encounter's calibrated probability, as the pipeline's predict_proba gives it."""
        ...

    def probabilities(self, frame: pl.DataFrame) -> np.ndarray:
        """The probabilities of every row of a frame holding `FEATURE_COLUMNS`."""
        ...

    def contributions(self, features: Mapping[str, float | str]) -> dict[str, float]:
        """Each feature's push on this encounter's risk in the model's own terms (see `method`)."""
        ...

    def explain(self, features: Mapping[str, float | str]) -> Attribution:
        """Each feature's push on the risk served; exact ones sum with a base value to its log-odds (see `method`)."""
        ...


def compile(pipeline: Pipeline, *, pin_on: pl.DataFrame | None = None, threads: int | None = None) -> FastScorer:  # noqa: A001
    """A fast scorer of `pipeline`, pinned to it on `pin_on` and on every category its encoders know.

    `UnsupportedModel` if the pipeline is of no shape a scorer knows, or the scorer fails the pin. `threads`: threads
    that share a batch (default one).
    """
    found = parts(pipeline)
    linear = isinstance(found.estimator, LogisticRegression)
    scorer: FastScorer = LinearScorer(found) if linear else TreeScorer(found, threads=threads)
    every_category = probe(domains(found.encoder))
    pin(scorer, pipeline, every_category if pin_on is None else pl.concat([pin_on.select(FEATURE_COLUMNS), every_category], how="vertical_relaxed"))
    return scorer


def pin(scorer: FastScorer, pipeline: Pipeline, frame: pl.DataFrame, *, tolerance: float = 1e-9) -> float:
    """The largest difference between the scorer (one by one, and the frame at once) and the pipeline's own
    probabilities over a features frame; `UnsupportedModel` past `tolerance`."""
    expected = predict_probability(pipeline, frame)
    one_by_one = np.array([scorer.probability(row) for row in frame.select(FEATURE_COLUMNS).iter_rows(named=True)])
    got = np.concatenate([one_by_one, scorer.probabilities(frame)])
    worst = float(np.max(np.abs(np.tile(expected, 2) - got))) if len(got) else 0.0
    if not worst <= tolerance:
        raise UnsupportedModel(
            f"the fast path fails its pin: it differs from the pipeline's predict_proba by up to {worst:.3g} over "
            f"{len(got)} rows (tolerance {tolerance:g}); score with the pipeline itself"
        )
    return worst
