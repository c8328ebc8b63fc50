"""Schemathesis over every route of the served /docs.json, with all its checks: the document is the contract."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from readmission_platform_tests.serving.conftest import TOKEN

SEED = 20_261_201


# Examples per operation and phase. Schemathesis' coverage phase, every documented answer of every route, is most
# of the cases either way; `make test` fuzzes each route with 40 examples, `make contract` with 150.
@pytest.mark.parametrize(
    ("examples", "at_least"),
    [pytest.param(40, 1_900, id="make-test"), pytest.param(150, 2_000, id="deep", marks=pytest.mark.contract)],
)
def test_every_answer_of_every_route_is_the_documented_one(gated_server, tmp_path, examples, at_least):
    command = [
        str(Path(sys.executable).with_name("st")), "run", f"{gated_server.url}/docs.json", "--checks", "all",
        "--header", f"Authorization: Bearer {TOKEN}", "--seed", str(SEED), "--max-examples", str(examples),
        "--workers", "1", "--no-color", "--report", "junit", "--report-dir", str(tmp_path),
    ]  # fmt: skip
    run = subprocess.run(command, capture_output=True, text=True, timeout=1_800, cwd=tmp_path)
    summary = run.stdout[run.stdout.rfind("SUMMARY") :]
    print(summary)
    assert run.returncode == 0, run.stdout[-20_000:]
    generated = int(re.search(r"(\d+) generated", summary)[1])
    assert generated >= at_least and "Tested: 8" in summary, summary


def test_a_prediction_is_encoded_as_pydantic_writes_the_model():
    import numpy as np

    from readmission_platform.serving.contract import Prediction, prediction_answer

    rng = np.random.default_rng(0)
    probabilities = [0.0, 1.0, 0.1, 1e-7, 0.9999999999999999, *rng.random(2_000), *(rng.random(500) ** 20)]
    for i, probability in enumerate(probabilities):
        fields = {
            "probability": float(probability), "decision": i % 2 == 0, "risk_band": ("low", "medium", "high")[i % 3],
            "threshold": float(rng.random()), "model_name": "readmission-classifier", "model_version": str(i),
            "stage": ("production", "canary")[i % 2], "request_id": f"ward-7/é\"{i}", "history_used": i % 5 == 0,
        }  # fmt: skip
        answer = prediction_answer(**fields)
        assert answer.body == Prediction(**fields).model_dump_json().encode()
        assert answer.media_type == "application/json"
    numpy_typed = prediction_answer(**fields | {"probability": np.float64(0.25), "decision": np.bool_(True), "threshold": np.float64(0.5)})
    assert numpy_typed.body == Prediction(**fields | {"probability": 0.25, "decision": True, "threshold": 0.5}).model_dump_json().encode()
