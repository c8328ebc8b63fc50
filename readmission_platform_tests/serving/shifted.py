"""A planted candidate whose scores are shifted: a real model's probability of readmission raised by `shift`.

It loads, passes the smoke test and never raises, so only its score distribution (PSI against production's) and its
disagreement with production give it away. Importable by the serving workers, which load it through skops.
"""

from __future__ import annotations

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin


class Shifted(ClassifierMixin, BaseEstimator):
    """`model`'s probabilities with `shift` added to the positive class (clipped to [0, 1])."""

    def __init__(self, model=None, shift: float = 0.3) -> None:
        self.model = model
        self.shift = shift

    @property
    def classes_(self):
        return self.model.classes_

    def predict_proba(self, frame):
        positive = np.clip(self.model.predict_proba(frame)[:, 1] + self.shift, 0.0, 1.0)
        return np.column_stack([1 - positive, positive])

    def predict(self, frame):
        return (self.predict_proba(frame)[:, 1] >= 0.5).astype(int)
