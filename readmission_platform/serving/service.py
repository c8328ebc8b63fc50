"""The BentoML service: probability of readmission within 30 days for encounters as the hospital system records them.

Routes: POST /predict (one encounter), POST /predict_batch ({"encounters": [...]}, up to MAX_BATCH), POST /explain,
GET /model (the model serving now), and BentoML's /livez, /readyz (ready once a model is loaded) and /metrics.
Each worker serves the version behind the MLflow alias `production` and checks the alias every
READMISSION_RELOAD_SECONDS (default 30), swapping to a new version only once it has loaded and passed its smoke
test. Every prediction goes to the prediction log (READMISSION_PREDICTION_LOG_URL, default SQLite under
READMISSION_HOME). With READMISSION_API_TOKEN set, the prediction routes and /model need `Authorization: Bearer <token>`.

Run it from the repository root with `bentoml serve .`, or a built Bento with `bentoml serve readmission:latest`
(BENTOML_HOME=$READMISSION_HOME/bentoml); `readmission serve` does the latter.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import secrets
import threading
import uuid
from typing import Any, Literal

import bentoml
import numpy as np
import polars as pl
import prometheus_client
import threadpoolctl
from fastapi import FastAPI
from pydantic import BaseModel, Field, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from readmission_platform.lib.cleaning import clean_record
from readmission_platform.lib.encounter import (
    FIELDS,
    MAX_BATCH,
    REQUEST_ID,
    BatchRequest,
    Encounter,
    decode_batch,
    features_frame,
    record,
)
from readmission_platform.lib.features import FEATURE_COLUMNS, record_features
from readmission_platform.lib.reporting import masked
from readmission_platform.serving.model import ServedModel, load_version, production_version, serve
from readmission_platform.serving.package import MLFLOW_MODEL_FOLDER, PACKED_MODEL
from readmission_platform.serving.prediction_log import PredictionLog
from readmission_platform.settings import Settings

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
    probability: float
    decision: bool
    risk_band: Literal["low", "medium", "high"]
    request_id: str


class BatchPrediction(BaseModel):
    model_name: str
    model_version: str
    threshold: float
    predictions: list[BatchItem] = Field(description="One per encounter, in the order sent.")


class Contribution(BaseModel):
    feature: str
    value: float | str
    contribution: float


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


class BearerToken:
    """ASGI middleware: 401 on the prediction routes unless `Authorization: Bearer <READMISSION_API_TOKEN>`.

    Also counts every 4xx answer of those routes (validation errors included) in `readmission_rejected_requests`.
    """

    def __init__(self, app: Any) -> None:
        self.app = app
        token = os.environ.get("READMISSION_API_TOKEN") or ""
        self.expected = f"Bearer {token}".encode() if token else None

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        path = scope.get("path", "")
        if scope["type"] != "http" or not path.startswith(PROTECTED):
            await self.app(scope, receive, send)
            return
        route = path.rstrip("/") or "/"
        if self.expected is not None:
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not secrets.compare_digest(given, self.expected):
                REJECTED.labels(route=route, status="401").inc()
                response = JSONResponse(
                    {"error": "missing or wrong bearer token: send the header 'Authorization: Bearer <token>'"},
                    status_code=401,
                    headers={"WWW-Authenticate": "Bearer"},
                )
                await response(scope, receive, send)
                return

        async def counting_send(message: dict) -> None:
            if message["type"] == "http.response.start" and 400 <= message["status"] < 500:
                REJECTED.labels(route=route, status=str(message["status"])).inc()
            await send(message)

        await self.app(scope, receive, counting_send)


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
        threadpoolctl.threadpool_limits(THREADS)
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
        given = record(encounter)
        probability = model.probability(record_features(clean_record(given)))
        decision, band, request_id = self._answer(model, probability, "predict", given, encounter.request_id)
        return Prediction(
            probability=probability, decision=decision, risk_band=band, threshold=model.threshold,
            model_name=model.name, model_version=model.version, request_id=request_id,
        )  # fmt: skip

    def answer_batch(self, encounters: pl.DataFrame) -> Response:
        """Score validated encounters (`decode_batch`), log them, and answer in order, all by one model version."""
        model = self.model
        probability = model.probabilities(features_frame(encounters))
        batch = uuid.uuid4().hex
        answers = pl.DataFrame(
            {
                "probability": probability,
                "decision": probability >= model.threshold,
                "risk_band": model.risk_bands(probability),
                REQUEST_ID: encounters[REQUEST_ID].fill_null(pl.format(f"{batch}-{{}}", pl.int_range(encounters.height))),
            }
        )
        flagged = int(answers["decision"].sum())
        PREDICTIONS.labels(model_version=model.version, decision="flagged").inc(flagged)
        PREDICTIONS.labels(model_version=model.version, decision="not_flagged").inc(answers.height - flagged)
        observe_many(PROBABILITY, probability)
        self.log.record_frame(
            answers.with_columns(
                encounters.select(FIELDS),
                endpoint=pl.lit("predict_batch"), model_name=pl.lit(model.name), model_version=pl.lit(model.version),
            )  # fmt: skip
        )
        head = json.dumps({"model_name": model.name, "model_version": model.version, "threshold": model.threshold})
        return Response(f'{head[:-1]},"predictions":{answers.write_json()}}}', media_type="application/json")

    @bentoml.api(route="/explain")
    def explain(self, encounter: Encounter, /) -> Explanation:
        """Which features pushed this encounter's risk up or down, and by how much (see `method`)."""
        # A plain function: BentoML runs it in a thread, as withholding each feature in turn takes milliseconds.
        if (model := self.model) is None:
            return _not_ready()  # type: ignore[return-value]
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


ReadmissionService.add_asgi_middleware(BearerToken)
