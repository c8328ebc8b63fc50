"""The /predict route around the service's answer: a defect inside it is the contract's 500, named in the log."""

from __future__ import annotations

import logging

import bentoml
from starlette.testclient import TestClient

from readmission_platform.serving import service
from readmission_platform.serving.model import SMOKE_ENCOUNTERS


class Broken:
    async def predict(self, encounter):
        raise RuntimeError("a defect in the service")


def test_a_defect_behind_predict_is_answered_as_the_contracts_500_and_logged(monkeypatch, caplog):
    # No served model raises on demand: the service the route finds is one whose answer is a defect.
    monkeypatch.setattr(bentoml, "get_current_service", Broken)
    with caplog.at_level(logging.ERROR, logger=service.__name__), TestClient(service.routes) as client:
        answer = client.post("/predict", json=dict(SMOKE_ENCOUNTERS[0]))
        refused = client.post("/predict", json={"age": "[0-10)"})
    assert answer.status_code == 500 and answer.json() == {"error": service.UNEXPECTED}
    assert [r.getMessage() for r in caplog.records] == ["POST /predict failed"]
    assert "a defect in the service" in caplog.text  # its traceback, for whoever mends it
    assert refused.status_code == 400 and refused.json()["error"].endswith("validation errors for Encounter")
