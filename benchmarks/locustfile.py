"""Load for `make loadtest`: each user POSTs one encounter after another to /predict, with no pause.

Encounters come from the JSON list at READMISSION_LOADTEST_ENCOUNTERS (loadtest.py writes real test-split ones).
Any answer but a 200 naming a model version counts as a failure.
"""

import itertools
import json
import os

from locust import FastHttpUser, constant, task

with open(os.environ["READMISSION_LOADTEST_ENCOUNTERS"], "rb") as file:
    BODIES = [json.dumps(e).encode() for e in json.load(file)]
_next = itertools.cycle(range(len(BODIES)))
HEADERS = {"Content-Type": "application/json"}
if os.environ.get("READMISSION_API_TOKEN"):
    HEADERS["Authorization"] = f"Bearer {os.environ['READMISSION_API_TOKEN']}"


class Clinician(FastHttpUser):
    wait_time = constant(0)

    @task
    def predict(self) -> None:
        with self.client.post("/predict", data=BODIES[next(_next)], headers=HEADERS, catch_response=True) as answer:
            if answer.status_code != 200:
                answer.failure(f"status {answer.status_code}: {answer.text[:200]}")
            elif "model_version" not in answer.text:
                answer.failure("no model_version in the answer")
