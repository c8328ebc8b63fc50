"""The prediction routes around the service's answers: a defect inside one is the contract's 500, named in the log."""

from __future__ import annotations

import logging

import bentoml
import pytest
from starlette.testclient import TestClient

from readmission_platform.serving import service
from readmission_platform.serving.model import SMOKE_ENCOUNTERS


class Broken:
    model = "loaded"

    async def predict(self, encounter):
        raise RuntimeError("a defect in the service")

    def answer_batch(self, encounters):
        raise RuntimeError("a defect in the service")


@pytest.mark.parametrize("route", ["/predict", "/predict_batch"])
def test_a_defect_behind_a_prediction_route_is_answered_as_the_contracts_500_and_logged(monkeypatch, caplog, route):
    # No served model raises on demand: the service the route finds is one whose answers are a defect.
    monkeypatch.setattr(bentoml, "get_current_service", Broken)
    good = dict(SMOKE_ENCOUNTERS[0])
    with caplog.at_level(logging.ERROR, logger=service.__name__), TestClient(service.routes) as client:
        answer = client.post(route, json=good if route == "/predict" else {"encounters": [good]})
        refused = client.post(route, json={"age": "[0-10)"})
    assert answer.status_code == 500 and answer.json() == {"error": service.UNEXPECTED}
    assert [r.getMessage() for r in caplog.records] == [f"POST {route} failed"]
    assert "a defect in the service" in caplog.text  # its traceback, for whoever mends it
    assert refused.status_code == 400 and " validation error" in refused.json()["error"]
    declared = service.openapi_document(service.ReadmissionService.openapi_spec.asdict(), token=False, max_body=1)
    assert declared["paths"][route]["post"]["responses"]["500"]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/Error"}
