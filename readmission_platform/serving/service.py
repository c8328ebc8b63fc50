"""The BentoML service: probability of readmission within 30 days for encounters as the hospital system records them.

Routes: POST /predict (one encounter), POST /predict_batch ({"encounters": [...]}, up to MAX_BATCH), POST /explain,
GET /model (the model serving now), and BentoML's /livez, /readyz (ready once a model is loaded) and /metrics.
Each worker serves the version behind the MLflow alias `production` and checks the alias every
READMISSION_RELOAD_SECONDS (default 30), swapping to a new version only once it has loaded and passed its smoke
test. Beside it a worker holds at most one candidate, the version behind `shadow` (scored beside production and
logged, never returned) or `canary` (answering the requests whose request_id hashes below the share the registry
gives it); a candidate's failure never fails a request (`serving/rollout.py`). Every prediction goes to the
prediction log (READMISSION_PREDICTION_LOG_URL, default SQLite under READMISSION_HOME). With READMISSION_API_TOKEN set, the prediction routes and /model need `Authorization: Bearer <token>`.
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
import secrets
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import bentoml
import numpy as np
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
    MAX_ENCOUNTER_BYTES,
    PATIENT_ID,
    REQUEST_ID,
    BatchRequest,
    Encounter,
    features_frame,
    record,
)
from readmission_platform.lib.features import FEATURE_COLUMNS, by_field, record_features
from readmission_platform.lib.predictions import PATIENT_KEY
from readmission_platform.lib.registry import CANARY, PRODUCTION, SHADOW
from readmission_platform.lib.routing import canary_rows, to_canary
from readmission_platform.serving.contract import (
    BatchPrediction,
    Contribution,
    Explanation,
    FieldContribution,
    batch_answer,
    inlined,
    invalid,
    not_ready,
    openapi_document,
    out_of_scope_answer,
    prediction_answer,
)
from readmission_platform.serving.fast.decode import decode_batch
from readmission_platform.serving.gate import RequestGate, RoutesOnly
from readmission_platform.serving.history import PatientHistory
from readmission_platform.serving.metrics import (
    DURATION_BUCKETS,
    LOG_DROPPED,
    PREDICTED,
    PROBABILITY,
    SCORED,
)
from readmission_platform.serving.model import ServedModel
from readmission_platform.serving.prediction_log import PredictionLog
from readmission_platform.serving.rollout import NO_CANDIDATE, Candidate, Trials, candidate_columns, candidate_frame_columns
from readmission_platform.serving.watcher import ModelWatcher
from readmission_platform.settings import ServingSettings, Settings, keep_private

log = logging.getLogger(__name__)

# Read once per worker: BentoML imports this module in each worker process.
SERVING = ServingSettings.from_env()
MAX_BODY_BYTES = SERVING.max_body_bytes or MAX_BATCH_BYTES
# The cyclic garbage collector's thresholds in a worker, once it has started (see `ReadmissionService.__init__`).
GC_THRESHOLDS = (10_000, 20, 20)
# How long a thread that wants the GIL waits for the one holding it to let go (Python's default 5 ms): the event loop
# waits this long behind a shadow's scoring thread, a batch's threads or the prediction log's sender.
SWITCH_SECONDS = 0.001

UNEXPECTED = "An unexpected error has occurred, please check the server log."  # BentoML's words for a 500

# Mounted at the root: BentoML mounts apps passively, so this one only takes the paths it has routes for.
routes = FastAPI(title="readmission", docs_url=None, redoc_url=None, openapi_url=None)


@routes.get("/model", summary="The model serving now: version, lineage, metrics, threshold; and the candidate beside it.")
def model_info() -> JSONResponse:
    service = bentoml.get_current_service()
    model = service.model
    if model is None:
        return not_ready(service.watcher.unserved)
    candidate = service.candidate
    return JSONResponse(
        {**model.info, "alias": "production", "stage": PRODUCTION, "loaded_at": model.loaded_at, "worker_pid": os.getpid(),
         "reload_seconds": SERVING.reload_seconds, "explain_method": model.method,
         "production_not_loaded": service.watcher.not_loaded,
         "candidate": candidate.describe() if candidate is not None else None,
         "candidate_timeout_ms": SERVING.candidate_timeout_ms}
    )  # fmt: skip


async def _one_encounter(
    request: Request, route: str, answer: Callable[[Any, Encounter], Awaitable[Response]]
) -> Response:
    """A route of one encounter: the body validated by the request model (a 400 naming each offending field), then
    `answer(service, encounter)`; a defect is answered as BentoML answers one on its own routes (the contract's 500).

    /predict and /explain are plain Starlette routes, declared in the contract by `contract.openapi_document`:
    BentoML's typed API and FastAPI's route handling around the same work cost a request more than all of the
    platform's own (benchmarks/README.md, Serving). Whatever the gate in front of them checks (token, Content-Type,
    size) is checked for them too.
    """
    try:
        encounter = Encounter.model_validate_json(await request.body() or b"{}")  # an empty body as BentoML reads it
    except ValidationError as error:
        return invalid(error)
    try:
        return await answer(bentoml.get_current_service(), encounter)
    except Exception:
        log.exception("POST %s failed", route)
        return JSONResponse({"error": UNEXPECTED}, status_code=500)


async def predict(request: Request) -> Response:
    """POST /predict: answered by `ReadmissionService.predict`."""
    return await _one_encounter(request, "/predict", lambda service, encounter: service.predict(encounter))


async def explain(request: Request) -> Response:
    """POST /explain: answered by `ReadmissionService.explain` in a thread, as withholding each feature in turn takes
    milliseconds."""
    return await _one_encounter(request, "/explain", lambda service, one: run_in_threadpool(service.explain, one))


routes.add_route("/predict", predict, methods=["POST"])
routes.add_route("/explain", explain, methods=["POST"])


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
        return not_ready(service.watcher.unserved)
    body = await request.body()
    try:
        encounters = await run_in_threadpool(decode_batch, body)
    except ValidationError as error:
        answer = invalid(error)
        # Raised in a worker thread, its traceback is a reference cycle with the thread's frames; cut, the errors go
        # now, not at a full collection, which the worker's collector thresholds make rare.
        error.__traceback__ = None
        return answer
    try:
        return await run_in_threadpool(service.answer_batch, encounters)
    except Exception:  # a defect, as on /predict
        log.exception("POST /predict_batch failed")
        return JSONResponse({"error": UNEXPECTED}, status_code=500)


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
    candidate: Candidate | None  # the version behind `shadow` or `canary`, kept by the watcher (`serving.rollout`)

    def __init__(self) -> None:
        # The platform's loggers write where BentoML's do, in its format (worker name, time).
        platform_log = logging.getLogger("readmission_platform")
        if not platform_log.handlers:
            platform_log.handlers = logging.getLogger("bentoml").handlers
            platform_log.setLevel(logging.INFO)
            platform_log.propagate = False
        routes_named = {"/", "/docs.json", "/predict", "/explain", *ReadmissionService.openapi_spec.paths}  # plain routes
        logging.getLogger("bentoml.access").addFilter(RoutesOnly(frozenset(routes_named)))
        threadpoolctl.threadpool_limits(SERVING.threads)
        keep_private()  # the prediction log, when it is a SQLite file of this worker's making
        settings = Settings.from_env()
        self.model = None
        self.candidate = None
        self.trials = Trials(SERVING.candidate_timeout_ms)
        self.log = PredictionLog(
            settings.prediction_log_url, capacity=SERVING.log_queue_rows, on_drop=LOG_DROPPED.inc, nice=SERVING.log_writer_nice
        )
        # The patients' history states, kept in memory and read again when the pipeline writes them anew.
        key = settings.patient_key
        self.history = PatientHistory(
            settings.prediction_log_url if key else None,
            key.encode() if key else None,
            interval=SERVING.reload_seconds,
        )
        self.history.refresh()
        self.history.start()
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
        sys.setswitchinterval(SWITCH_SECONDS)

    def __is_ready__(self) -> bool:
        return self.model is not None

    @bentoml.on_shutdown
    def _shutdown(self) -> None:
        self.watcher.stopped.set()
        self.trials.close()
        self.history.stopped.set()
        self.log.close()
        log.info("prediction log closed: %d rows written, %d dropped", self.log.written, self.log.dropped)

    def _answer(
        self, model: ServedModel, stage: str, probability: float, endpoint: str, given: dict[str, Any], request_id: str,
        rollout: dict[str, Any] = NO_CANDIDATE, patient: str | None = None,
    ) -> tuple[bool, str]:
        """Count and log an answer of `model` at `stage`; its decision and risk band. `rollout`: the log's candidate
        columns (`candidate_columns`); `patient`: the keyed hash of the request's patient_id."""
        decision = probability >= model.threshold
        PREDICTED(model.version, stage, "flagged" if decision else "not_flagged").inc()
        PROBABILITY.observe(probability)
        band = model.risk_band(probability)
        self.log.record(
            [{"request_id": request_id, "endpoint": endpoint, "model_name": model.name, "model_version": model.version,
              "probability": probability, "decision": decision, "risk_band": band, "stage": stage, **rollout,
              PATIENT_KEY: patient, "inputs": given}]
        )  # fmt: skip
        return decision, band

    async def predict(self, encounter: Encounter) -> Response:
        """POST /predict's answer: the probability of readmission within 30 days of one encounter, its decision and
        risk band (a `Prediction`), or why there is none."""
        if (model := self.model) is None:
            return not_ready(self.watcher.unserved)
        if (refused := out_of_scope_answer(encounter)) is not None:
            return refused
        given = record(encounter)
        patient, state = self.history.lookup(encounter.patient_id)
        features = record_features(clean_record(given), state)
        request_id = encounter.request_id or secrets.token_hex(16)  # as a uuid4's hex, for less than its cost
        candidate = self.candidate
        trial = None
        if candidate is not None and (candidate.stage == SHADOW or to_canary(request_id, candidate.share)):
            trial = await self.trials.one(candidate, features)
            if trial.ok:
                SCORED(candidate.version, candidate.stage, "predict").observe(trial.ms / 1000)
        if trial is not None and trial.ok and candidate.stage == CANARY:
            answering, stage, probability = candidate.model, CANARY, float(trial.answer)
        else:
            started = time.perf_counter()
            answering, stage, probability = model, PRODUCTION, model.probability(features)
            SCORED(model.version, PRODUCTION, "predict").observe(time.perf_counter() - started)
        rollout = candidate_columns(candidate, trial)
        decision, band = self._answer(answering, stage, probability, "predict", given, request_id, rollout, patient)
        return prediction_answer(
            probability=probability, decision=decision, risk_band=band, threshold=answering.threshold,
            model_name=answering.name, model_version=answering.version, stage=stage, request_id=request_id,
            history_used=state is not None,
        )  # fmt: skip

    def answer_batch(self, encounters: pl.DataFrame) -> Response:
        """Score validated encounters (`decode_batch`), log them, and answer in order; an encounter out of scope is
        answered without a probability, with its reason, and not logged. With a canary, each encounter is routed by
        its own request_id (one made up when it has none), so a batch splits between the versions as single requests
        do; with a shadow, the shadow scores every encounter too, its answers logged."""
        model, candidate = self.model, self.candidate
        batch = uuid.uuid4().hex
        request_ids = encounters[REQUEST_ID].fill_null(pl.format(f"{batch}-{{}}", pl.int_range(encounters.height)))
        out = encounters["discharge_disposition_id"].is_in(schema.DEATH_OR_HOSPICE_DISPOSITIONS)
        scored = encounters.filter(~out) if (unscored := int(out.sum())) else encounters
        scored_ids = request_ids.filter(~out) if unscored else request_ids
        states, used, patients = self.history.states(scored[PATIENT_ID])
        features = features_frame(scored, states)
        routed = None  # the rows the canary answers
        trial = None
        if candidate is not None and candidate.stage == SHADOW:
            trial = self.trials.many(candidate, features)
        elif candidate is not None and (routed := canary_rows(scored_ids.to_list(), candidate.share)).any():
            trial = self.trials.many(candidate, features.filter(pl.Series(routed)))
        if trial is not None and trial.ok:
            SCORED(candidate.version, candidate.stage, "predict_batch").observe(trial.ms / 1000)
        canary = routed is not None and trial is not None and trial.ok
        started = time.perf_counter()
        if canary:
            probability = np.empty(scored.height)
            probability[routed] = trial.answer
            probability[~routed] = model.probabilities(features.filter(pl.Series(~routed)))
        else:
            probability = model.probabilities(features)
        SCORED(model.version, PRODUCTION, "predict_batch").observe(time.perf_counter() - started)
        if canary:
            answerer = candidate.model
            threshold = np.where(routed, answerer.threshold, model.threshold)
            bands = np.where(routed, answerer.risk_bands(probability), model.risk_bands(probability))
            versions = np.where(routed, answerer.version, model.version)
            stages = np.where(routed, CANARY, PRODUCTION)
        else:
            threshold, bands = model.threshold, model.risk_bands(probability)
            versions, stages = np.full(scored.height, model.version), np.full(scored.height, PRODUCTION)
        answers = pl.DataFrame(
            {
                "probability": probability,
                "decision": probability >= threshold,
                "risk_band": bands,
                REQUEST_ID: scored_ids,
                "model_version": pl.Series(versions, dtype=pl.String),
                "stage": pl.Series(stages, dtype=pl.String),
                "history_used": used,
            }
        )
        self._count_batch(answers)
        for value in probability.tolist():  # prometheus_client has no public way to observe many at once
            PROBABILITY.observe(value)
        self.log.record_frame(
            answers.with_columns(
                scored.select(FIELDS), endpoint=pl.lit("predict_batch"), model_name=pl.lit(model.name),
                **{PATIENT_KEY: patients if patients is not None else pl.lit(None, pl.String)},
                **candidate_frame_columns(candidate, trial, routed, scored.height),
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

    @staticmethod
    def _count_batch(answers: pl.DataFrame) -> None:
        counts = answers.group_by("model_version", "stage", "decision").len()
        for version, stage, decision, count in counts.iter_rows():
            PREDICTED(version, stage, "flagged" if decision else "not_flagged").inc(count)

    def explain(self, encounter: Encounter) -> Response:
        """POST /explain's answer: which features pushed this encounter's risk up or down, and by how much (an
        `Explanation`, see `method`), or why there is none."""
        if (model := self.model) is None:
            return not_ready(self.watcher.unserved)
        if (refused := out_of_scope_answer(encounter)) is not None:
            return refused
        given = record(encounter)
        patient, state = self.history.lookup(encounter.patient_id)
        features = record_features(clean_record(given), state)
        if model.scorer is None:
            return JSONResponse({"error": f"version {model.version} cannot be explained: {model.method}"}, status_code=501)
        probability = model.probability(features)
        attribution = model.scorer.explain(features)
        terms = attribution.terms
        request_id = encounter.request_id or uuid.uuid4().hex
        decision, _ = self._answer(model, PRODUCTION, probability, "explain", given, request_id, patient=patient)
        ranked = sorted(FEATURE_COLUMNS, key=lambda name: -abs(terms[name]))
        fields = sorted(
            (FieldContribution(field=field, contribution=math.fsum(found.values()), features=list(found))
             for field, found in by_field(terms).items()),
            key=lambda f: -abs(f.contribution),
        )  # fmt: skip
        explanation = Explanation(
            probability=probability, decision=decision, model_name=model.name, model_version=model.version,
            stage=PRODUCTION, method=model.method, history_used=state is not None, exact=attribution.base is not None,
            unit="probability" if attribution.base is None else "log-odds", base_value=attribution.base,
            log_odds=attribution.log_odds(probability), request_id=request_id,
            contributions=[Contribution(feature=n, value=features[n], contribution=terms[n]) for n in ranked],
            fields=fields,
        )  # fmt: skip
        return Response(explanation.model_dump_json(), media_type="application/json")


ReadmissionService.add_asgi_middleware(
    RequestGate,
    token=SERVING.api_token,
    max_body=MAX_BODY_BYTES,
    one_encounter=MAX_ENCOUNTER_BYTES,
    document=lambda token: openapi_document(
        ReadmissionService.openapi_spec.asdict(), token=token, max_body=MAX_BODY_BYTES, one_encounter=MAX_ENCOUNTER_BYTES
    ),
)
