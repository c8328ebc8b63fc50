"""The BentoML service: probability of readmission within 30 days for encounters as the hospital system records them.

Routes: POST /predict (one encounter), POST /predict_batch ({"encounters": [...]}, up to MAX_BATCH), POST /explain,
GET /model (the model serving now), and BentoML's /livez, /readyz (ready once a model is loaded) and /metrics.
Each worker serves the version behind the MLflow alias `production` and checks the alias every
READMISSION_RELOAD_SECONDS (default 30), swapping to a new version only once it has loaded and passed its smoke
test. Every prediction goes to the prediction log (READMISSION_PREDICTION_LOG_URL, default SQLite under
READMISSION_HOME). With READMISSION_API_TOKEN set, the prediction routes and /model need `Authorization: Bearer <token>`.
The prediction routes take `application/json` bodies of at most READMISSION_MAX_BODY_BYTES (default: a full batch at
its largest, `encounter.MAX_BATCH_BYTES`); /docs.json is the contract, every answer of every route declared.

Run it from the repository root with `bentoml serve .`, or a built Bento with `bentoml serve readmission:latest`
(BENTOML_HOME=$READMISSION_HOME/bentoml); `readmission serve` does the latter.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import re
import secrets
import threading
import time
import uuid
from typing import Any, Literal

import bentoml
import numpy as np
import polars as pl
import prometheus_client
import threadpoolctl
from fastapi import FastAPI
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from readmission_platform.lib import schema
from readmission_platform.lib.cleaning import clean_record
from readmission_platform.lib.encounter import (
    DEATH_OR_HOSPICE,
    FIELDS,
    MAX_BATCH,
    MAX_BATCH_BYTES,
    REQUEST_ID,
    BatchRequest,
    Encounter,
    features_frame,
    openapi_3_0,
    out_of_scope,
    record,
)
from readmission_platform.lib.features import FEATURE_COLUMNS, record_features
from readmission_platform.lib.reporting import masked
from readmission_platform.serving.fast.decode import decode_batch
from readmission_platform.serving.model import ServedModel, load_version, production_version, serve
from readmission_platform.serving.package import MLFLOW_MODEL_FOLDER, PACKED_MODEL
from readmission_platform.serving.prediction_log import PredictionLog
from readmission_platform.settings import Settings, keep_private

log = logging.getLogger(__name__)

MAX_ERRORS = 1_000  # validation errors listed in one answer; the count says how many there were
RELOAD_SECONDS = float(os.environ.get("READMISSION_RELOAD_SECONDS") or 30)
FAST_PATH = os.environ.get("READMISSION_FAST_PATH", "1") != "0"
# Native threads per worker (OpenMP, BLAS). Scale with workers instead: with more threads than free cores,
# histogram gradient boosting's OpenMP loops slowed a 10,000-encounter batch from 0.12 s to 0.9 s on 2 loaded cores.
THREADS = int(os.environ.get("READMISSION_SERVE_THREADS") or 1)
# Predictions a worker keeps waiting for its log writer; past that they are dropped and counted, never waited for.
# A batch's rows take about 250 bytes each there, a single prediction's a few KB: the default holds ten full batch
# requests, or some seconds of a log database that lags.
LOG_QUEUE_ROWS = int(os.environ.get("READMISSION_PREDICTION_LOG_QUEUE_ROWS") or 100_000)
# The log writer's niceness (see `PredictionLog`): with two workers saturating 2 cores, writers at the default priority
# fell behind and dropped 15-26 % of the rows; at -5 they kept every row, at a median of 132,105 encounters/s.
LOG_WRITER_NICE = int(os.environ.get("READMISSION_PREDICTION_LOG_NICE") or -5)
# The cyclic garbage collector's thresholds in a worker, once it has started (see `ReadmissionService.__init__`).
GC_THRESHOLDS = (10_000, 20, 20)
# A version that failed to load is tried again after this many checks, in case the failure was passing.
RETRY_REFUSED_AFTER = 10
PROTECTED = ("/predict", "/predict_batch", "/explain", "/model")
POSTED = ("/predict", "/predict_batch", "/explain")
MAX_BODY_BYTES = int(os.environ.get("READMISSION_MAX_BODY_BYTES") or MAX_BATCH_BYTES)
# Refused requests are logged one line each, at most this many in a burst and then one a second (per worker), so that
# a flood of bad requests cannot grow the log without bound; the rest are counted in readmission_refusals_unlogged.
REFUSAL_LOG_BURST = 60

PREDICTIONS = prometheus_client.Counter(
    name="readmission_predictions", documentation="Predictions made, by model version and decision.",
    labelnames=["model_version", "decision"],
)  # fmt: skip
PROBABILITY = prometheus_client.Histogram(
    name="readmission_prediction_probability", documentation="Predicted probabilities of readmission within 30 days.",
    buckets=(0.02, 0.05, 0.08, 0.11, 0.14, 0.17, 0.2, 0.3, 0.4, 0.6, 1.0),
)  # fmt: skip
REJECTED = prometheus_client.Counter(
    name="readmission_rejected_requests", documentation="Requests answered with a 4xx status, by route and status.",
    labelnames=["route", "status"],
)  # fmt: skip
RELOADS = prometheus_client.Counter(
    name="readmission_model_reloads", documentation="Model loads by outcome: loaded (now serving) or failed.",
    labelnames=["outcome"],
)  # fmt: skip
LOG_DROPPED = prometheus_client.Counter(
    name="readmission_prediction_log_dropped", documentation="Predictions the log could not keep (queue full, writes failing).",
)  # fmt: skip
UNLOGGED = prometheus_client.Counter(
    name="readmission_refusals_unlogged", documentation="Refused requests not written to the log, past its rate limit.",
)  # fmt: skip


class Prediction(BaseModel):
    probability: float = Field(description="Probability of readmission within 30 days.")
    decision: bool = Field(description="True when the probability is at least the model's threshold: flag for follow-up.")
    risk_band: Literal["low", "medium", "high"] = Field(
        description="high: flagged; medium: above the base rate of readmission but not flagged; low: the rest."
    )
    threshold: float
    model_name: str
    model_version: str
    request_id: str = Field(description="The client's request_id, or one made up for this prediction.")


class BatchItem(BaseModel):
    model_config = ConfigDict(json_schema_extra=openapi_3_0)

    probability: float | None = Field(description="null when the encounter is not scored (see `reason`).")
    decision: bool | None
    risk_band: Literal["low", "medium", "high"] | None
    request_id: str
    reason: Literal["death_or_hospice"] | None = Field(
        None, description="Why the encounter is not scored: discharged to death or hospice. Absent or null when scored."
    )


class BatchPrediction(BaseModel):
    model_name: str
    model_version: str
    threshold: float
    predictions: list[BatchItem] = Field(description="One per encounter, in the order sent.")


class Contribution(BaseModel):
    feature: str
    value: float | str
    contribution: float


class OutOfScope(BaseModel):
    model_config = ConfigDict(json_schema_extra=openapi_3_0)

    error: str
    reason: Literal["death_or_hospice"]
    request_id: str


class Explanation(BaseModel):
    probability: float
    decision: bool
    model_name: str
    model_version: str
    method: str = Field(description="How contributions are computed, and their unit.")
    contributions: list[Contribution] = Field(description="Every feature, the strongest push (up or down) first.")
    request_id: str


def observe_many(histogram: prometheus_client.Histogram, values: np.ndarray) -> None:
    """`histogram.observe` for every value, with one increment per bucket instead of one call per value."""
    bounds = getattr(histogram, "_upper_bounds", None)
    buckets = getattr(histogram, "_buckets", None)
    if bounds is None or buckets is None or len(bounds) != len(buckets):  # prometheus_client changed: the slow way
        for value in values:
            histogram.observe(float(value))
        return
    counts = np.bincount(np.searchsorted(bounds, values, side="left"), minlength=len(bounds))
    for bucket, count in zip(buckets, counts, strict=False):
        if count:
            bucket.inc(int(count))
    histogram._sum.inc(float(np.sum(values)))


def _not_ready() -> JSONResponse:
    """What every route answers before a model is loaded (BentoML would hide the reason of a raised 5xx)."""
    return JSONResponse(
        {"error": "no model loaded: nothing is promoted to 'production' in the registry, and no model is packed here"},
        status_code=503,
    )


def _out_of_scope(encounter: BaseModel) -> JSONResponse | None:
    """The 422 for an encounter no readmission risk is predicted for, or None."""
    if (disposition := encounter.discharge_disposition_id) not in schema.DEATH_OR_HOSPICE_DISPOSITIONS:
        return None
    return JSONResponse(
        {"error": out_of_scope(disposition), "reason": DEATH_OR_HOSPICE, "request_id": encounter.request_id or uuid.uuid4().hex},
        status_code=422,
    )


def _refusal(status: int, message: str) -> JSONResponse:
    # The body may be left unread: closing the connection saves reading the rest of it.
    return JSONResponse({"error": message}, status_code=status, headers={"Connection": "close"})


class RequestGate:
    """ASGI middleware in front of the prediction routes: the bearer token (READMISSION_API_TOKEN), a JSON body of at
    most `max_body` bytes, the count of 4xx answers, and one log line per refused request.

    Also answers /docs.json with the service's contract (`openapi_document`).
    """

    def __init__(self, app: Any, max_body: int = MAX_BODY_BYTES) -> None:
        self.app = app
        self.max_body = max_body
        self.token = (os.environ.get("READMISSION_API_TOKEN") or "").encode() or None
        self.refusals = RefusalLog(REFUSAL_LOG_BURST)
        self._document: bytes | None = None

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        route = scope.get("path", "").rstrip("/")
        if scope["type"] != "http" or route not in PROTECTED:
            if route == "/docs.json" and scope["type"] == "http":
                await self._send_document(scope, receive, send)
                return
            await self.app(scope, receive, send)
            return
        authorization = content_type = content_length = None
        for name, value in scope["headers"]:
            if name == b"authorization":
                authorization = value
            elif name == b"content-type":
                content_type = value
            elif name == b"content-length":
                content_length = value
        refused = None
        if self.token is not None and not self._authorized(authorization):
            refused = JSONResponse(
                {"error": "missing or wrong bearer token: send the header 'Authorization: Bearer <token>'"},
                status_code=401, headers={"WWW-Authenticate": "Bearer"},
            )  # fmt: skip
        elif route in POSTED and scope["method"] != "POST":
            # Answered here: past BentoML's routes, the app mounted at the root would say 404.
            refused = JSONResponse({"error": f"{route} takes POST"}, status_code=405, headers={"Allow": "POST"})
        elif route in POSTED:
            if content_type is None or content_type.partition(b";")[0].strip().lower() != b"application/json":
                refused = _refusal(415, "the body must be JSON: send the header 'Content-Type: application/json'")
            elif content_length is not None and int(content_length) > self.max_body:
                refused = _refusal(413, f"the body is larger than {self.max_body:,} bytes")
            elif content_length is None:  # chunked: counted as it arrives, and the app given it once it is whole
                receive = await self._read_limited(receive)
                if receive is None:
                    refused = _refusal(413, f"the body is larger than {self.max_body:,} bytes")
        if refused is not None:
            REJECTED.labels(route=route, status=str(refused.status_code)).inc()
            self.refusals.write(route, refused.status_code, "")
            await refused(scope, receive, send)
            return

        status = 0
        answer: list[bytes] = []

        async def counting_send(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                if 400 <= status < 500:
                    REJECTED.labels(route=route, status=str(status)).inc()
            elif 400 <= status < 500 and message["type"] == "http.response.body":
                answer.append(message.get("body", b""))
                if not message.get("more_body"):
                    self.refusals.write(route, status, _offending(b"".join(answer)))
            await send(message)

        await self.app(scope, receive, counting_send)

    def _authorized(self, authorization: bytes | None) -> bool:
        """`Bearer <token>`, the scheme in any case (RFC 7235), the token compared in constant time."""
        scheme, _, token = (authorization or b"").partition(b" ")
        return scheme.lower() == b"bearer" and secrets.compare_digest(token.strip(b" "), self.token)

    async def _read_limited(self, receive: Any) -> Any:
        """A `receive` replaying the body read so far, or None once it passes `max_body`."""
        messages, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client went away: the app sees it too
                messages.append(message)
                break
            size += len(message.get("body", b""))
            if size > self.max_body:
                return None
            messages.append(message)
            if not message.get("more_body"):
                break
        replay = iter(messages)

        async def replaying() -> dict:
            return next(replay, None) or await receive()

        return replaying

    async def _send_document(self, scope: dict, receive: Any, send: Any) -> None:
        if self._document is None:
            self._document = json.dumps(openapi_document(ReadmissionService.openapi_spec.asdict(), self.token is not None)).encode()
        await Response(self._document, media_type="application/json")(scope, receive, send)


# Names a log line may hold; a key the client made up is a value of theirs and is written as "(unknown)".
_KNOWN_NAMES = frozenset({*schema.RAW_COLUMNS, REQUEST_ID, "encounters"})
_MAX_NAMED = 20


def _offending(answer: bytes) -> str:
    """The fields and error kinds of a refusal's answer (`detail`'s loc and type, or `reason`), values left out."""
    try:
        found = json.loads(answer)
    except ValueError:
        return ""
    if not isinstance(found, dict):
        return ""
    if found.get("reason") == DEATH_OR_HOSPICE:
        return f"discharge_disposition_id ({DEATH_OR_HOSPICE})"
    detail = found.get("detail")
    counts: dict[str, int] = {}
    for error in (e for e in detail if isinstance(e, dict)) if isinstance(detail, list) else ():
        where = ".".join(
            "*" if isinstance(p, int) else p if str(p) in _KNOWN_NAMES else "(unknown)" for p in error.get("loc", ())
        )
        kind = error.get("type")
        key = f"{where or '(body)'} ({kind if isinstance(kind, str) and kind.isidentifier() else '?'})"
        counts[key] = counts.get(key, 0) + 1
    named = [f"{key} x{count:,}" if count > 1 else key for key, count in list(counts.items())[:_MAX_NAMED]]
    more = f", and {len(counts) - _MAX_NAMED:,} more" if len(counts) > _MAX_NAMED else ""
    return ", ".join(named) + more


class RefusalLog:
    """One WARNING line per refused request, through a token bucket: `burst` lines at once, then one a second."""

    def __init__(self, burst: int) -> None:
        self.burst = burst
        self.tokens = float(burst)
        self.last = time.monotonic()

    def write(self, route: str, status: int, offending: str) -> None:
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + now - self.last)
        self.last = now
        if self.tokens < 1:
            UNLOGGED.inc()
            return
        self.tokens -= 1
        log.warning("refused %s %d%s", route, status, f": {offending}" if offending else "")


class _WithoutValidationTracebacks(logging.Filter):
    """Drops BentoML's ERROR with traceback for a request its request model refused: the traceback holds pydantic's
    `input_value`s, and `RequestGate` logs the refusal in one line without them."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.exc_info and isinstance(record.exc_info[1], ValidationError))


class _RoutesOnly(logging.Filter):
    """Names in BentoML's access log only the paths that are routes: any other path is the client's, and may hold
    an identifier (`/patients/8222157`)."""

    def __init__(self, routes: frozenset[str]) -> None:
        super().__init__()
        self.routes = routes

    def filter(self, record: logging.LogRecord) -> bool:
        # BentoML's format: address, "scheme=…,method=…,path=…[,length=…]", the response, the latency.
        if isinstance(record.args, tuple) and len(record.args) == 4 and isinstance(record.args[1], str):
            request = _ACCESS_REQUEST.fullmatch(record.args[1])
            if request is None or request["path"] not in self.routes:
                head, length = (request["head"], request["length"] or "") if request else ("", "")
                record.args = (record.args[0], f"{head}path=(not a route){length}", *record.args[2:])
        return True


_ACCESS_REQUEST = re.compile(r"(?P<head>.*?,)path=(?P<path>.*?)(?P<length>,length=[0-9]*)?", re.DOTALL)


def _invalid(error: ValidationError) -> JSONResponse:
    """A 400 naming each offending field, as BentoML answers for its own routes."""
    count = error.error_count()
    listed = f" (the first {MAX_ERRORS:,} listed)" if count > MAX_ERRORS else ""
    return JSONResponse(
        {"error": f"{count} validation error{'s' if count > 1 else ''} for {error.title}{listed}",
         "detail": error.errors(include_context=False, include_input=False)[:MAX_ERRORS]},
        status_code=400,
    )  # fmt: skip


def _inlined(model: type[BaseModel]) -> dict[str, Any]:
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


def openapi_document(bentoml_document: dict[str, Any], token: bool) -> dict[str, Any]:
    """BentoML's OpenAPI document with the answers each route really gives; `token`: the bearer token is required.

    BentoML declares the same errors for every @bentoml.api route (`detail` a string, a 404 and a 500) and none for
    the mounted routes.
    """
    document = json.loads(json.dumps(bentoml_document))
    components = document["components"]["schemas"]
    for unused in ("InvalidArgument", "NotFound", "InternalServerError", "TaskStatusResponse"):
        components.pop(unused, None)
    components |= {"Error": _ERROR, "ValidationErrors": _VALIDATION_ERRORS, "OutOfScope": _inlined(OutOfScope)}
    refused = {
        "401": _answer_of("Missing or wrong bearer token (`Authorization: Bearer <token>`).", "Error"),
        "503": _answer_of("No model loaded yet: nothing is promoted to 'production', and none is packed here.", "Error"),
    }
    if not token:
        del refused["401"]
    bodies = {
        "400": _answer_of("Malformed input, every offending field named (`loc`, `msg`, `type`).", "ValidationErrors"),
        "413": _answer_of(f"A body of more than READMISSION_MAX_BODY_BYTES bytes ({MAX_BODY_BYTES:,} here).", "Error"),
        "415": _answer_of("A body not declared `Content-Type: application/json`.", "Error"),
    }
    out_of_scope = {"422": _answer_of("The encounter is out of the model's scope (`reason`): no probability.", "OutOfScope")}
    bentoml_failed = {"500": _answer_of("A defect in the service; its log says more.", "Error")}
    answers = {
        "/predict": refused | bodies | out_of_scope | bentoml_failed,
        "/explain": refused | bodies | out_of_scope | bentoml_failed
        | {"501": _answer_of("The model serving has no way to be explained.", "Error")},
        "/predict_batch": refused | bodies,
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


# Mounted at the root: BentoML mounts apps passively, so this one only takes the paths it has routes for.
routes = FastAPI(title="readmission", docs_url=None, redoc_url=None, openapi_url=None)


@routes.get("/model", summary="The model serving now: version, lineage, metrics, threshold.")
def model_info() -> JSONResponse:
    service = bentoml.get_current_service()
    model = service.model
    if model is None:
        return _not_ready()
    return JSONResponse(
        {**model.info, "alias": "production", "loaded_at": model.loaded_at, "worker_pid": os.getpid(),
         "reload_seconds": RELOAD_SECONDS, "explain_method": model.method}
    )  # fmt: skip


@routes.post(
    "/predict_batch",
    response_model=BatchPrediction,
    summary=f"Many encounters at once (1 to {MAX_BATCH:,}), answered in order, all by the same model version.",
    openapi_extra={"requestBody": {"required": True, "content": {"application/json": {"schema": _inlined(BatchRequest)}}}},
)
async def predict_batch(request: Request) -> Response:
    # The body is read here, not by a request model: msgspec checks it several times faster than pydantic, and only
    # a body it refuses goes through pydantic, for errors that name every offending field.
    service = bentoml.get_current_service()
    if service.model is None:
        return _not_ready()
    body = await request.body()
    try:
        encounters = await run_in_threadpool(decode_batch, body)
    except ValidationError as error:
        return _invalid(error)
    return await run_in_threadpool(service.answer_batch, encounters)


class ModelWatcher(threading.Thread):
    """Keeps a worker on the version behind `production`: a first load, then a check every `interval` seconds."""

    def __init__(self, service: ReadmissionService, settings: Settings, interval: float) -> None:
        super().__init__(name="model-watcher", daemon=True)
        self.service = service
        self.interval = interval
        self.settings = settings
        self._registry = None  # opened on first use, so an unreachable store cannot stop a worker from starting
        self.refused: dict[str, int] = {}  # version → checks left before trying it again
        self.packed_tried = False
        self.stopped = threading.Event()

    @property
    def registry(self):
        if self._registry is None:
            from readmission_platform.lib.registry import ModelRegistry

            self._registry = ModelRegistry(self.settings.mlflow_tracking_uri, self.settings.mlflow_artifact_root.as_uri())
        return self._registry

    def run(self) -> None:
        while not self.stopped.wait(self.interval):
            self.check()

    def check(self) -> None:
        try:
            version = production_version(self.registry)
        except Exception as error:  # the registry's database is unreachable
            log.warning("cannot read the 'production' alias from %s: %s", masked(self.settings.mlflow_tracking_uri), error)
            version = None
        current = self.service.model
        if version is None:
            if current is None and not self.packed_tried:
                self.packed_tried = True  # once: it is packed in the Bento and does not change
                self.service.model = _packed_model()
            return
        if current is not None and current.version == version:
            return
        if self.refused.get(version, 0) > 0:
            self.refused[version] -= 1
            return
        try:
            model = load_version(self.registry, version, fast=FAST_PATH, threads=THREADS)
        except Exception as error:
            RELOADS.labels(outcome="failed").inc()
            self.refused[version] = RETRY_REFUSED_AFTER
            log.error("version %s stays unserved, %s: %s", version,
                      f"version {current.version} keeps serving" if current else "no model serves", error)  # fmt: skip
            return
        self.service.model = model
        self.refused.pop(version, None)
        RELOADS.labels(outcome="loaded").inc()
        log.info("now serving version %s of %s (was %s)", version, model.name, current.version if current else "none")


def _packed_model() -> ServedModel | None:
    """The model packed in this Bento (or BentoML's model store), for when the registry has none to give."""
    try:
        packed = bentoml.models.get(f"{PACKED_MODEL}:latest")
    except bentoml.exceptions.NotFound:
        return None
    import mlflow.sklearn

    try:
        info = json.loads(packed.info.metadata["info"]) | {"served_from": f"BentoML model {packed.tag}"}
        model = serve(mlflow.sklearn.load_model(packed.path_of(MLFLOW_MODEL_FOLDER)), info, fast=FAST_PATH, threads=THREADS)
    except Exception as error:
        RELOADS.labels(outcome="failed").inc()
        log.error("the packed model %s cannot serve: %s", packed.tag, error)
        return None
    RELOADS.labels(outcome="loaded").inc()
    log.info("serving the packed model %s (version %s): the registry has no 'production' version to give", packed.tag,
             model.version)  # fmt: skip
    return model


@bentoml.asgi_app(routes, path="/")
@bentoml.service(
    name="readmission",
    workers=int(os.environ.get("READMISSION_SERVE_WORKERS") or 1),
    traffic={"timeout": 120},
    # A request's Content-Type is the client's text: left out of the access log, with the paths that are not routes.
    logging={"access": {"request_content_type": False}},
)
class ReadmissionService:
    model: ServedModel | None

    def __init__(self) -> None:
        # The platform's loggers write where BentoML's do, in its format (worker name, time).
        platform_log = logging.getLogger("readmission_platform")
        if not platform_log.handlers:
            platform_log.handlers = logging.getLogger("bentoml").handlers
            platform_log.setLevel(logging.INFO)
            platform_log.propagate = False
        logging.getLogger("bentoml._internal.server.http_app").addFilter(_WithoutValidationTracebacks())
        logging.getLogger("bentoml.access").addFilter(_RoutesOnly(frozenset({"/", "/docs.json", *ReadmissionService.openapi_spec.paths})))
        threadpoolctl.threadpool_limits(THREADS)
        keep_private()  # the prediction log, when it is a SQLite file of this worker's making
        settings = Settings.from_env()
        self.model = None
        self.log = PredictionLog(
            settings.prediction_log_url, capacity=LOG_QUEUE_ROWS, on_drop=LOG_DROPPED.inc, nice=LOG_WRITER_NICE
        )
        self.watcher = ModelWatcher(self, settings, RELOAD_SECONDS)
        self.watcher.check()
        self.watcher.start()
        # A batch request makes tens of thousands of short-lived containers, and Python's default thresholds then
        # collect often enough to walk the worker's whole heap (BentoML, MLflow, scikit-learn, the model) again and
        # again: 50-70 ms of a 10,000-encounter request's 250 here. What is loaded by now (modules, the first model) is
        # moved out of the collector's sight, and the young generation is collected less often. A model replaced later
        # is still freed when its last reference goes; only reference cycles within it would stay.
        gc.freeze()
        gc.set_threshold(*GC_THRESHOLDS)

    def __is_ready__(self) -> bool:
        return self.model is not None

    @bentoml.on_shutdown
    def _shutdown(self) -> None:
        self.watcher.stopped.set()
        self.log.close()
        log.info("prediction log closed: %d rows written, %d dropped", self.log.written, self.log.dropped)


    def _answer(self, model: ServedModel, probability: float, endpoint: str, given: dict[str, Any], request_id: str | None):
        decision = probability >= model.threshold
        request_id = request_id or uuid.uuid4().hex
        PREDICTIONS.labels(model_version=model.version, decision="flagged" if decision else "not_flagged").inc()
        PROBABILITY.observe(probability)
        band = model.risk_band(probability)
        self.log.record(
            [{"request_id": request_id, "endpoint": endpoint, "model_name": model.name, "model_version": model.version,
              "probability": probability, "decision": decision, "risk_band": band, "inputs": given}]
        )  # fmt: skip
        return decision, band, request_id

    @bentoml.api(route="/predict")
    async def predict(self, encounter: Encounter, /) -> Prediction:
        """The probability of readmission within 30 days of one encounter, its decision and risk band."""
        if (model := self.model) is None:
            return _not_ready()  # type: ignore[return-value]
        if (refused := _out_of_scope(encounter)) is not None:
            return refused  # type: ignore[return-value]
        given = record(encounter)
        probability = model.probability(record_features(clean_record(given)))
        decision, band, request_id = self._answer(model, probability, "predict", given, encounter.request_id)
        return Prediction(
            probability=probability, decision=decision, risk_band=band, threshold=model.threshold,
            model_name=model.name, model_version=model.version, request_id=request_id,
        )  # fmt: skip

    def answer_batch(self, encounters: pl.DataFrame) -> Response:
        """Score validated encounters (`decode_batch`), log them, and answer in order, all by one model version; an
        encounter out of scope is answered without a probability, with its reason, and not logged."""
        model = self.model
        batch = uuid.uuid4().hex
        request_ids = encounters[REQUEST_ID].fill_null(pl.format(f"{batch}-{{}}", pl.int_range(encounters.height)))
        out = encounters["discharge_disposition_id"].is_in(schema.DEATH_OR_HOSPICE_DISPOSITIONS)
        scored = encounters.filter(~out) if (unscored := int(out.sum())) else encounters
        probability = model.probabilities(features_frame(scored))
        answers = pl.DataFrame(
            {
                "probability": probability,
                "decision": probability >= model.threshold,
                "risk_band": model.risk_bands(probability),
                REQUEST_ID: request_ids.filter(~out) if unscored else request_ids,
            }
        )
        flagged = int(answers["decision"].sum())
        PREDICTIONS.labels(model_version=model.version, decision="flagged").inc(flagged)
        PREDICTIONS.labels(model_version=model.version, decision="not_flagged").inc(answers.height - flagged)
        observe_many(PROBABILITY, probability)
        self.log.record_frame(
            answers.with_columns(
                scored.select(FIELDS),
                endpoint=pl.lit("predict_batch"), model_name=pl.lit(model.name), model_version=pl.lit(model.version),
            )  # fmt: skip
        )
        if unscored:
            answers = (
                pl.concat([answers, pl.DataFrame({REQUEST_ID: request_ids.filter(out)})], how="diagonal")
                .with_columns(reason=pl.when(pl.col("probability").is_null()).then(pl.lit(DEATH_OR_HOSPICE)))
                .with_columns(order=pl.concat([(~out).arg_true(), out.arg_true()]))
                .sort("order")
                .drop("order")
            )
        head = json.dumps({"model_name": model.name, "model_version": model.version, "threshold": model.threshold})
        return Response(f'{head[:-1]},"predictions":{answers.write_json()}}}', media_type="application/json")

    @bentoml.api(route="/explain")
    def explain(self, encounter: Encounter, /) -> Explanation:
        """Which features pushed this encounter's risk up or down, and by how much (see `method`)."""
        # A plain function: BentoML runs it in a thread, as withholding each feature in turn takes milliseconds.
        if (model := self.model) is None:
            return _not_ready()  # type: ignore[return-value]
        if (refused := _out_of_scope(encounter)) is not None:
            return refused  # type: ignore[return-value]
        given = record(encounter)
        features = record_features(clean_record(given))
        if model.scorer is None:
            return JSONResponse({"error": f"version {model.version} cannot be explained: {model.method}"}, status_code=501)  # type: ignore[return-value]
        probability = model.probability(features)
        contributions = model.scorer.contributions(features)
        decision, _, request_id = self._answer(model, probability, "explain", given, encounter.request_id)
        ranked = sorted(FEATURE_COLUMNS, key=lambda name: -abs(contributions[name]))
        return Explanation(
            probability=probability, decision=decision, model_name=model.name, model_version=model.version,
            method=model.method, request_id=request_id,
            contributions=[Contribution(feature=n, value=features[n], contribution=contributions[n]) for n in ranked],
        )  # fmt: skip


ReadmissionService.add_asgi_middleware(RequestGate)
