"""The service's contract: the answers' models, the 400 for malformed input, and the OpenAPI document that declares
every answer each route gives (/docs.json)."""

from __future__ import annotations

import json
import uuid
from typing import Any, Literal

import msgspec
import polars as pl
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.responses import JSONResponse, Response

from readmission_platform.lib import schema
from readmission_platform.lib.encounter import DEATH_OR_HOSPICE, Encounter, openapi_3_0, out_of_scope

HISTORY_USED = (
    "True when the request's patient_id was looked up in the patients' history (an unknown patient has none yet); "
    "false without a patient_id or where the service keeps no history: the history features then are those of a "
    "first encounter."
)
MAX_ERRORS = 1_000  # validation errors listed in one answer; the count says how many there were
Stage = Literal["production", "canary"]
STAGE_DESCRIPTION = (
    "Which rollout stage answered: production, or the canary, which answers the requests whose request_id hashes "
    "below its share (a shadow is never returned)."
)


class Prediction(BaseModel):
    probability: float = Field(description="Probability of readmission within 30 days.")
    decision: bool = Field(description="True when the probability is at least the model's threshold: flag for follow-up.")
    risk_band: Literal["low", "medium", "high"] = Field(
        description="high: flagged; medium: above the base rate of readmission but not flagged; low: the rest."
    )
    threshold: float
    model_name: str
    model_version: str = Field(description="The version that answered: production's, or the canary's (`stage`).")
    stage: Stage = Field(description=STAGE_DESCRIPTION)
    request_id: str = Field(description="The client's request_id, or one made up for this prediction.")
    history_used: bool = Field(description=HISTORY_USED)


class BatchItem(BaseModel):
    model_config = ConfigDict(json_schema_extra=openapi_3_0)

    probability: float | None = Field(description="null when the encounter is not scored (see `reason`).")
    decision: bool | None
    risk_band: Literal["low", "medium", "high"] | None
    request_id: str
    model_version: str | None = Field(description="The version that answered this encounter; null when not scored.")
    stage: Stage | None = Field(description=f"{STAGE_DESCRIPTION} Null when not scored.")
    history_used: bool | None = Field(None, description=HISTORY_USED + " Null when the encounter is not scored.")
    reason: Literal["death_or_hospice"] | None = Field(
        None, description="Why the encounter is not scored: discharged to death or hospice. Absent or null when scored."
    )


class BatchPrediction(BaseModel):
    model_name: str
    model_version: str = Field(description="The production version; an encounter the canary answered names its own.")
    threshold: float = Field(description="The production version's threshold.")
    predictions: list[BatchItem] = Field(description="One per encounter, in the order sent.")


class Contribution(BaseModel):
    feature: str
    value: float | str
    contribution: float


class FieldContribution(BaseModel):
    field: str = Field(description="A field of the encounter as recorded (`age`, `diag_1`, `insulin` …), or `history`.")
    contribution: float = Field(description="The sum of its features' contributions.")
    features: list[str]


class OutOfScope(BaseModel):
    model_config = ConfigDict(json_schema_extra=openapi_3_0)

    error: str
    reason: Literal["death_or_hospice"]
    request_id: str


class Explanation(BaseModel):
    model_config = ConfigDict(json_schema_extra=openapi_3_0)

    probability: float
    decision: bool
    model_name: str
    model_version: str
    stage: Literal["production"] = Field(description="Explanations are always of the production version.")
    method: str = Field(description="How contributions are computed, and their unit.")
    exact: bool = Field(description="True when `base_value` plus every contribution is `log_odds`, exactly.")
    unit: Literal["log-odds", "probability"] = Field(description="The unit of `base_value` and the contributions.")
    base_value: float | None = Field(description="Where the contributions start from (log-odds); null when not exact.")
    log_odds: float = Field(
        description="The log-odds of `probability`: log(p / (1 - p)). Where p is 0 or 1 in floating point (log-odds "
        "past about ±37), the model's own log-odds when `exact`, else those of the nearest probability inside (0, 1)."
    )
    contributions: list[Contribution] = Field(description="Every feature, the strongest push (up or down) first.")
    fields: list[FieldContribution] = Field(
        description="The contributions summed per recorded field (or history), the strongest push first."
    )
    request_id: str
    history_used: bool = Field(description=HISTORY_USED)



NOTHING_PROMOTED = "nothing is promoted to 'production' in the registry, and no model is packed here"


def not_ready(why: str) -> JSONResponse:
    """What every route answers before a model is loaded, and `why` (`ModelWatcher.unserved`; BentoML would hide the
    reason of a raised 5xx)."""
    return JSONResponse({"error": f"no model loaded: {why}"}, status_code=503)


def out_of_scope_answer(encounter: BaseModel) -> JSONResponse | None:
    """The 422 for an encounter no readmission risk is predicted for, or None."""
    if (disposition := encounter.discharge_disposition_id) not in schema.DEATH_OR_HOSPICE_DISPOSITIONS:
        return None
    return JSONResponse(
        {"error": out_of_scope(disposition), "reason": DEATH_OR_HOSPICE, "request_id": encounter.request_id or uuid.uuid4().hex},
        status_code=422,
    )



def invalid(error: ValidationError) -> JSONResponse:
    """A 400 naming each offending field, as BentoML answers for its own routes; unknown keys the batch decoder left
    unvalidated (`decode._by_request_model`) are counted, not listed."""
    detail = error.errors(include_context=False, include_input=False)[:MAX_ERRORS]
    count = error.error_count() + getattr(error, "unvalidated_keys", 0)
    listed = f" (the first {len(detail):,} listed)" if count > len(detail) else ""
    return JSONResponse(
        {"error": f"{count} validation error{'s' if count > 1 else ''} for {error.title}{listed}", "detail": detail},
        status_code=400,
    )  # fmt: skip


def inlined(model: type[BaseModel]) -> dict[str, Any]:
    """The model's JSON schema with its definitions inlined, for an OpenAPI request body of its own."""
    found = model.model_json_schema()
    definitions = found.pop("$defs", {})

    def inline(node: Any) -> Any:
        if isinstance(node, dict):
            if set(node) == {"$ref"}:
                return inline(definitions[node["$ref"].rsplit("/", 1)[-1]])
            return {k: inline(v) for k, v in node.items()}
        return [inline(v) for v in node] if isinstance(node, list) else node

    return inline(found)


def _answer_of(description: str, component: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{component}"}}}}


_ERROR = {
    "type": "object", "required": ["error"],
    "properties": {"error": {"type": "string", "description": "What was wrong, and what would be right."}},
}  # fmt: skip
_VALIDATION_ERRORS = {
    "type": "object", "required": ["error", "detail"],
    "properties": {
        "error": {"type": "string", "description": "How many validation errors there were."},
        "detail": {
            "type": "array", "maxItems": MAX_ERRORS, "description": "Each offending field: where, what it expects.",
            "items": {
                "type": "object", "required": ["loc", "msg", "type"],
                "properties": {
                    "loc": {"type": "array", "items": {"anyOf": [{"type": "string"}, {"type": "integer"}]}},
                    "msg": {"type": "string"}, "type": {"type": "string"},
                },
            },
        },
    },
}  # fmt: skip


def openapi_document(
    bentoml_document: dict[str, Any], *, token: bool, max_body: int, one_encounter: int | None = None
) -> dict[str, Any]:
    """BentoML's OpenAPI document with /predict and /explain, routes of their own, and the answers each route really
    gives; `token`: the bearer token is required; `max_body`: the largest body taken, in bytes; `one_encounter`: the largest
    body of one encounter's routes (/predict, /explain), if less.

    BentoML declares the same errors for every @bentoml.api route (`detail` a string, a 404 and a 500) and none for
    the mounted routes.
    """
    document = json.loads(json.dumps(bentoml_document))
    for route, summary, answer in (
        ("/predict", "One encounter: its probability of readmission within 30 days, decision and risk band.", Prediction),
        ("/explain", "Which features pushed one encounter's risk up or down, and by how much (see `method`).", Explanation),
    ):
        document["paths"][route] = {
            "post": {
                "tags": ["Service APIs"], "operationId": route.strip("/"), "summary": summary,
                "requestBody": {"content": {"application/json": {"schema": inlined(Encounter)}}},
                "responses": {"200": {"description": "Successful Response", "content": {"application/json": {"schema": inlined(answer)}}}},
            }
        }  # fmt: skip
    components = document["components"]["schemas"]
    for unused in ("InvalidArgument", "NotFound", "InternalServerError", "TaskStatusResponse"):
        components.pop(unused, None)
    components |= {"Error": _ERROR, "ValidationErrors": _VALIDATION_ERRORS, "OutOfScope": inlined(OutOfScope)}
    refused = {
        "401": _answer_of("Missing or wrong bearer token (`Authorization: Bearer <token>`).", "Error"),
        "405": _answer_of("A method the route does not take (`Allow` names the one it does).", "Error"),
        "503": _answer_of("No model loaded yet, and why: nothing is promoted to 'production' and none is packed here, or the promoted version did not load.", "Error"),
    }
    if not token:
        del refused["401"]
    bodies = {
        "400": _answer_of("Malformed input, every offending field named (`loc`, `msg`, `type`).", "ValidationErrors"),
        "413": _answer_of(f"A body of more than READMISSION_MAX_BODY_BYTES bytes ({max_body:,} here).", "Error"),
        "415": _answer_of("A body not declared `Content-Type: application/json`, or sent compressed (`Content-Encoding`).", "Error"),
    }
    out_of_scope = {"422": _answer_of("The encounter is out of the model's scope (`reason`): no probability.", "OutOfScope")}
    bentoml_failed = {"500": _answer_of("A defect in the service; its log says more.", "Error")}
    single = min(max_body, one_encounter or max_body)
    one = bodies | {"413": _answer_of(f"A body of more than {single:,} bytes: more than one encounter can need.", "Error")}
    answers = {
        "/predict": refused | one | out_of_scope | bentoml_failed,
        "/explain": refused | one | out_of_scope | bentoml_failed
        | {"501": _answer_of("The model serving has no way to be explained.", "Error")},
        "/predict_batch": refused | bodies | bentoml_failed,
        "/model": refused,
    }
    for route, declared in answers.items():
        for operation in document["paths"][route].values():
            operation["responses"] = {"200": operation["responses"].get("200") or operation["responses"][200]} | declared
            if "requestBody" in operation:
                operation["requestBody"]["required"] = True
            if token:
                operation["security"] = [{"bearer": []}]
    if token:
        document["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
    document["paths"]["/readyz"]["get"]["responses"]["503"] = {
        "description": "No model loaded yet.", "content": {"text/plain": {"schema": {"type": "string"}}},
    }  # fmt: skip
    return document



_ENCODER = msgspec.json.Encoder()


def prediction_answer(
    *, probability: float, decision: bool, risk_band: str, threshold: float, model_name: str, model_version: str,
    stage: str, request_id: str, history_used: bool,
) -> Response:
    """A `Prediction`, encoded as pydantic writes it (its fields in order; a test holds the bytes equal) without the
    model: validating and serializing the model cost /predict several times what encoding the values does
    (benchmarks/README.md, Serving)."""
    return Response(
        _ENCODER.encode({
            "probability": float(probability), "decision": bool(decision), "risk_band": risk_band,
            "threshold": float(threshold), "model_name": model_name, "model_version": model_version, "stage": stage,
            "request_id": request_id, "history_used": bool(history_used),
        }),
        media_type="application/json",
    )  # fmt: skip


def batch_answer(model_name: str, model_version: str, threshold: float, answers: pl.DataFrame) -> Response:
    """A `BatchPrediction` from the answers' frame, its rows written by polars in one pass rather than as pydantic
    models one by one."""
    head = json.dumps({"model_name": model_name, "model_version": model_version, "threshold": threshold})
    return Response(f'{head[:-1]},"predictions":{answers.write_json()}}}', media_type="application/json")
