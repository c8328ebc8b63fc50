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
import logging
import math
import os
import uuid
from typing import Any

import bentoml
import polars as pl
import threadpoolctl
from fastapi import FastAPI
from pydantic import ValidationError
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
    record,
)
from readmission_platform.lib.features import FEATURE_COLUMNS, by_field, record_features
from readmission_platform.serving.contract import (
    BatchPrediction,
    Contribution,
    Explanation,
    FieldContribution,
    Prediction,
    batch_answer,
    inlined,
    invalid,
    not_ready,
    openapi_document,
    out_of_scope_answer,
)
from readmission_platform.serving.fast.decode import decode_batch
from readmission_platform.serving.gate import RequestGate, RoutesOnly, WithoutValidationTracebacks
from readmission_platform.serving.metrics import DURATION_BUCKETS, LOG_DROPPED, PREDICTIONS, PROBABILITY, observe_many
from readmission_platform.serving.model import ServedModel
from readmission_platform.serving.prediction_log import PredictionLog
from readmission_platform.serving.watcher import ModelWatcher
from readmission_platform.settings import ServingSettings, Settings, keep_private

log = logging.getLogger(__name__)

# Read once per worker: BentoML imports this module in each worker process.
SERVING = ServingSettings.from_env()
MAX_BODY_BYTES = SERVING.max_body_bytes or MAX_BATCH_BYTES
# The cyclic garbage collector's thresholds in a worker, once it has started (see `ReadmissionService.__init__`).
GC_THRESHOLDS = (10_000, 20, 20)

# Mounted at the root: BentoML mounts apps passively, so this one only takes the paths it has routes for.
routes = FastAPI(title="readmission", docs_url=None, redoc_url=None, openapi_url=None)


@routes.get("/model", summary="The model serving now: version, lineage, metrics, threshold.")
def model_info() -> JSONResponse:
    service = bentoml.get_current_service()
    model = service.model
    if model is None:
        return not_ready()
    return JSONResponse(
        {**model.info, "alias": "production", "loaded_at": model.loaded_at, "worker_pid": os.getpid(),
         "reload_seconds": SERVING.reload_seconds, "explain_method": model.method}
    )  # fmt: skip


@routes.post(
    "/predict_batch",
    response_model=BatchPrediction,
    summary=f"Many encounters at once (1 to {MAX_BATCH:,}), answered in order, all by the same model version.",
    openapi_extra={"requestBody": {"required": True, "content": {"application/json": {"schema": inlined(BatchRequest)}}}},
)
async def predict_batch(request: Request) -> Response:
    # The body is read here, not by a request model: msgspec checks it several times faster than pydantic, and only
    # a body it refuses goes through pydantic, for errors that name every offending field.
    service = bentoml.get_current_service()
    if service.model is None:
        return not_ready()
    body = await request.body()
    try:
        encounters = await run_in_threadpool(decode_batch, body)
    except ValidationError as error:
        return invalid(error)
    return await run_in_threadpool(service.answer_batch, encounters)


@bentoml.asgi_app(routes, path="/")
@bentoml.service(
    name="readmission",
    workers=SERVING.workers,
    traffic={"timeout": 120},
    # A request's Content-Type is the client's text: left out of the access log, with the paths that are not routes.
    logging={"access": {"request_content_type": False}},
    metrics={"duration": {"buckets": list(DURATION_BUCKETS)}},
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
        logging.getLogger("bentoml._internal.server.http_app").addFilter(WithoutValidationTracebacks())
        logging.getLogger("bentoml.access").addFilter(RoutesOnly(frozenset({"/", "/docs.json", *ReadmissionService.openapi_spec.paths})))
        threadpoolctl.threadpool_limits(SERVING.threads)
        keep_private()  # the prediction log, when it is a SQLite file of this worker's making
        settings = Settings.from_env()
        self.model = None
        self.log = PredictionLog(
            settings.prediction_log_url, capacity=SERVING.log_queue_rows, on_drop=LOG_DROPPED.inc, nice=SERVING.log_writer_nice
        )
        self.watcher = ModelWatcher(self, settings, SERVING)
        self.watcher.check()
        self.watcher.start()
        # A batch request makes tens of thousands of short-lived containers, and Python's default thresholds then
        # collect often enough to walk the worker's whole heap (BentoML, MLflow, scikit-learn, the model) again and
        # again, a large share of the request's time (benchmarks/README.md). What is loaded by now (modules, the first
        # model) is moved out of the collector's sight, and the young generation is collected less often. A model replaced later
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
            return not_ready()  # type: ignore[return-value]
        if (refused := out_of_scope_answer(encounter)) is not None:
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
        return batch_answer(model.name, model.version, model.threshold, answers)

    @bentoml.api(route="/explain")
    def explain(self, encounter: Encounter, /) -> Explanation:
        """Which features pushed this encounter's risk up or down, and by how much (see `method`)."""
        # A plain function: BentoML runs it in a thread, as withholding each feature in turn takes milliseconds.
        if (model := self.model) is None:
            return not_ready()  # type: ignore[return-value]
        if (refused := out_of_scope_answer(encounter)) is not None:
            return refused  # type: ignore[return-value]
        given = record(encounter)
        features = record_features(clean_record(given))
        if model.scorer is None:
            return JSONResponse({"error": f"version {model.version} cannot be explained: {model.method}"}, status_code=501)  # type: ignore[return-value]
        probability = model.probability(features)
        attribution = model.scorer.explain(features)
        terms = attribution.terms
        decision, _, request_id = self._answer(model, probability, "explain", given, encounter.request_id)
        ranked = sorted(FEATURE_COLUMNS, key=lambda name: -abs(terms[name]))
        fields = sorted(
            (FieldContribution(field=field, contribution=math.fsum(found.values()), features=list(found))
             for field, found in by_field(terms).items()),
            key=lambda f: -abs(f.contribution),
        )  # fmt: skip
        return Explanation(
            probability=probability, decision=decision, model_name=model.name, model_version=model.version,
            method=model.method, exact=attribution.base is not None,
            unit="probability" if attribution.base is None else "log-odds", base_value=attribution.base,
            log_odds=math.log(probability / (1.0 - probability)), request_id=request_id,
            contributions=[Contribution(feature=n, value=features[n], contribution=terms[n]) for n in ranked],
            fields=fields,
        )  # fmt: skip


ReadmissionService.add_asgi_middleware(
    RequestGate,
    token=SERVING.api_token,
    max_body=MAX_BODY_BYTES,
    document=lambda token: openapi_document(ReadmissionService.openapi_spec.asdict(), token=token, max_body=MAX_BODY_BYTES),
)
