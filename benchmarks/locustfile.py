"""Load for `make loadtest`: each user POSTs one encounter after another to /predict, with no pause.

Encounters come from the JSON list at READMISSION_LOADTEST_ENCOUNTERS (loadtest.py writes real test-split ones).
Any answer but a 200 naming a model version counts as a failure. With READMISSION_LOADTEST_TIMES set, every
request's response time in milliseconds, as measured, is written there when locust quits: its own percentiles round
times under 100 ms to the whole millisecond, a sixth of a p99 of 6 ms.
"""

import itertools
import json
import os

from locust import FastHttpUser, constant, events, task

with open(os.environ["READMISSION_LOADTEST_ENCOUNTERS"], "rb") as file:
    BODIES = [json.dumps(e).encode() for e in json.load(file)]
_next = itertools.cycle(range(len(BODIES)))
HEADERS = {"Content-Type": "application/json"}
if os.environ.get("READMISSION_API_TOKEN"):
    HEADERS["Authorization"] = f"Bearer {os.environ['READMISSION_API_TOKEN']}"
TIMES: list[float] = []


@events.request.add_listener
def _timed(response_time: float, **_) -> None:
    TIMES.append(response_time)


@events.quitting.add_listener
def _write_times(**_) -> None:
    if path := os.environ.get("READMISSION_LOADTEST_TIMES"):
        with open(path, "w") as file:
            json.dump(TIMES, file)


class Clinician(FastHttpUser):
    wait_time = constant(0)

    @task
    def predict(self) -> None:
        with self.client.post("/predict", data=BODIES[next(_next)], headers=HEADERS, catch_response=True) as answer:
            if answer.status_code != 200:
                answer.failure(f"status {answer.status_code}: {answer.text[:200]}")
            elif "model_version" not in answer.text:
                answer.failure("no model_version in the answer")
