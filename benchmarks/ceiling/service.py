"""The ceiling baseline of `loadtest.py`: a BentoML service that answers a constant on the platform's /predict.

It takes the same request (the platform's `Encounter`, which BentoML validates as it does for the platform's typed
API), with the same server settings (one worker, the same access log and duration metric), and answers one
`Prediction` made up once: no model, history, cleaning, features, prediction log or metrics of its own. What the
platform's /predict does beyond it is the platform's own cost; the load test sets the two side by side.
"""

from __future__ import annotations

import bentoml

from readmission_platform.lib.encounter import Encounter
from readmission_platform.serving.contract import Prediction
from readmission_platform.serving.metrics import DURATION_BUCKETS

ANSWER = Prediction(
    probability=0.1, decision=False, risk_band="low", threshold=0.5, model_name="ceiling", model_version="0",
    stage="production", request_id="constant", history_used=False,
)  # fmt: skip


@bentoml.service(
    name="ceiling",
    workers=1,
    traffic={"timeout": 120},
    logging={"access": {"request_content_type": False}},
    metrics={"duration": {"buckets": list(DURATION_BUCKETS)}},
)
class Ceiling:
    @bentoml.api(route="/predict")
    async def predict(self, encounter: Encounter, /) -> Prediction:
        """The same answer to every encounter."""
        return ANSWER
