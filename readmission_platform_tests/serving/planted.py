"""Planted bad candidates: a real model wrapped so that it raises, or stalls, on encounters carrying a marker value.

They pass the smoke test (which carries no marker) and so load and serve as a candidate would, failing only on the
requests a test sends with the marker. Importable by the serving workers, which load them through skops.
"""

from __future__ import annotations

import time

import pandas as pd
from sklearn.base import BaseEstimator, ClassifierMixin

MARKER_COLUMN = "num_medications"
MARKER = 77  # no smoke encounter, and no encounter a test sends unless it means to, has 77 medications


class Planted(ClassifierMixin, BaseEstimator):
    """`model`'s probabilities, except that a batch holding the marker raises (`action="raise"`) or first sleeps
    `seconds` (`action="sleep"`)."""

    def __init__(self, model=None, action: str = "raise", seconds: float = 1.0) -> None:
        self.model = model
        self.action = action
        self.seconds = seconds

    @property
    def classes_(self):
        return self.model.classes_

    def predict_proba(self, frame: pd.DataFrame):
        if (frame[MARKER_COLUMN] == MARKER).any():
            if self.action == "raise":
                raise ValueError("planted failure on the marker encounter")
            time.sleep(self.seconds)
        return self.model.predict_proba(frame)

    def predict(self, frame: pd.DataFrame):
        return self.model.predict(frame)
