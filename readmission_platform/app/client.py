"""The app's one way to the BentoML service: its routes over HTTP, with the bearer token, and failures in plain words.

The app never loads a model: every probability, explanation and model fact it shows is the service's answer.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import httpx

PATIENT_ID = "patient_id"


class ServiceError(Exception):
    """The service did not give an answer; the message says why in words a clinician can pass on."""


class ServiceDown(ServiceError):
    """Nothing answers at the service's address."""


class NoModel(ServiceError):
    """The service runs but has no model to answer with (503)."""


class Refused(ServiceError):
    """The service refused the request: a wrong token, or an encounter it does not score (4xx)."""


class ServiceClient:
    """POST /predict, /explain, /predict_batch and GET /model, /docs.json of one service."""

    def __init__(self, url: str, token: str | None = None, timeout: float = 60.0) -> None:
        self.url = url.rstrip("/")
        self.timeout = timeout
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        try:
            self.http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout)
            self.http.build_request("GET", "/model")  # a URL httpx takes as a base may still make no request URL
        except httpx.InvalidURL as error:
            raise ServiceError(f"READMISSION_SERVICE_URL {url!r} is not a URL the app can call ({error}): set it to "
                               "the service's address, such as http://127.0.0.1:3100") from None  # fmt: skip

    def _call(self, method: str, path: str, body: Any = None) -> dict[str, Any]:
        try:
            answer = self.http.request(method, path, json=body)
        except (httpx.ReadTimeout, httpx.WriteTimeout):  # it took the connection: it runs
            raise ServiceError(
                f"the prediction service at {self.url} did not answer {path} within {self.timeout:g} s: it runs, but is "
                "slow or busy; try again, or send fewer encounters at once"
            ) from None
        except httpx.TransportError as error:
            raise ServiceDown(
                f"the prediction service at {self.url} does not answer ({type(error).__name__}): start it with "
                "`readmission serve`, or set READMISSION_SERVICE_URL to where it runs"
            ) from None
        if answer.status_code == 200:
            return answer.json()
        said = _error_text(answer)
        if answer.status_code == 503:
            raise NoModel(f"the prediction service at {self.url} has no model to answer with yet: {said}")
        if answer.status_code == 401:
            raise Refused(f"the prediction service refused the app's token: {said}. Set READMISSION_API_TOKEN to "
                          "the service's token")  # fmt: skip
        if answer.status_code in (400, 422):
            raise Refused(f"the prediction service did not score this encounter: {said}")
        raise ServiceError(f"the prediction service answered {answer.status_code} to {path}: {said}")

    def model(self) -> dict[str, Any]:
        """What /model tells of the version serving now."""
        return self._call("GET", "/model")

    def predict(self, encounter: Mapping[str, Any]) -> dict[str, Any]:
        return self._call("POST", "/predict", dict(encounter))

    def explain(self, encounter: Mapping[str, Any]) -> dict[str, Any]:
        return self._call("POST", "/explain", dict(encounter))

    def predict_batch(self, encounters: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        return self._call("POST", "/predict_batch", {"encounters": [dict(e) for e in encounters]})

    def request_fields(self) -> set[str]:
        """The fields the service's contract (/docs.json) declares for one encounter, the body of /predict; empty if
        it cannot be read."""
        try:
            document = self.http.get("/docs.json").json()
            body = document["paths"]["/predict"]["post"]["requestBody"]["content"]["application/json"]["schema"]
            if "$ref" in body:  # declared by reference rather than inline
                body = document["components"]["schemas"][body["$ref"].rsplit("/", 1)[-1]]
            return set(body["properties"])
        except (httpx.HTTPError, ValueError, KeyError, TypeError, AttributeError):
            return set()

    def close(self) -> None:
        self.http.close()


def _error_text(answer: httpx.Response) -> str:
    """The service's `error` (and, for a 400, each offending field) as one line."""
    try:
        body = answer.json()
    except ValueError:
        return answer.text.strip()[:300] or f"HTTP {answer.status_code}"
    if not isinstance(body, dict):
        return str(body)[:300]
    text = str(body.get("error") or body.get("detail") or body)
    if isinstance(body.get("detail"), list):
        fields = [f"{'.'.join(map(str, d.get('loc', ())[-1:]))}: {d.get('msg')}" for d in body["detail"][:5]]
        text += " (" + "; ".join(fields) + ")"
    return text
