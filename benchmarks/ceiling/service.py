"""The ceilings of `loadtest.py`: BentoML services that answer a constant on the platform's /predict.

`Ceiling` takes the request as the platform's /predict does: a plain route of an app mounted at the root, the body
validated by the platform's `Encounter`, with the same server settings (one worker, the same access log and duration
metric). It answers one `Prediction` made up once: no model, history, cleaning, features, prediction log or metrics of
its own, so what the platform's /predict does beyond it is the platform's own cost. `TypedCeiling` answers the same
constant through BentoML's typed API (`@bentoml.api`, which validates the same request model), as a service written
the plainest way would, and as the platform's /predict did before it became a route of its own.
"""

from __future__ import annotations

import bentoml
from fastapi import FastAPI
from pydantic import ValidationError
from starlette.requests import Request
from starlette.responses import Response

from readmission_platform.lib.encounter import Encounter
from readmission_platform.serving.contract import Prediction, invalid
from readmission_platform.serving.metrics import DURATION_BUCKETS

ANSWER = Prediction(
    probability=0.1, decision=False, risk_band="low", threshold=0.5, model_name="ceiling", model_version="0",
    stage="production", request_id="constant", history_used=False,
)  # fmt: skip
ENCODED = ANSWER.model_dump_json().encode()
SETTINGS = {
    "workers": 1,
    "traffic": {"timeout": 120},
    "logging": {"access": {"request_content_type": False}},
    "metrics": {"duration": {"buckets": list(DURATION_BUCKETS)}},
}


async def predict(request: Request) -> Response:
    """The platform's /predict route (`serving.service.predict`) with a constant in place of the service's answer."""
    try:
        Encounter.model_validate_json(await request.body() or b"{}")
    except ValidationError as error:
        return invalid(error)
    return Response(ENCODED, media_type="application/json")


routes = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)
routes.add_route("/predict", predict, methods=["POST"])


@bentoml.asgi_app(routes, path="/")
@bentoml.service(name="ceiling", **SETTINGS)
class Ceiling:
    """No API of BentoML's own: /predict is the mounted app's route."""


@bentoml.service(name="typed-ceiling", **SETTINGS)
class TypedCeiling:
    @bentoml.api(route="/predict")
    async def predict(self, encounter: Encounter, /) -> Prediction:
        """The same answer to every encounter."""
        return ANSWER
