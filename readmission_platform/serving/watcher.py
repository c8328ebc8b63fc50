"""Keeps a serving worker on the version behind the alias `production`, or on the model packed in its Bento, and on
the candidate behind `shadow` or `canary` (`serving.rollout`)."""

from __future__ import annotations

import json
import logging
import threading
from dataclasses import replace
from typing import Protocol

import bentoml

from readmission_platform.lib.reporting import masked
from readmission_platform.serving.contract import NOTHING_PROMOTED
from readmission_platform.serving.metrics import READY, RELOADS, VALIDATION_POSITIVE_RATE
from readmission_platform.lib.registry import CANARY, SHADOW
from readmission_platform.serving.model import ServedModel, load_version, serve
from readmission_platform.serving.rollout import Candidate, RolloutState, count_failures_of, rollout_state
from readmission_platform.serving.package import MLFLOW_MODEL_FOLDER, PACKED_MODEL
from readmission_platform.settings import ServingSettings, Settings

log = logging.getLogger(__name__)


class Serving(Protocol):
    """What the watcher keeps up to date: the model a worker answers with, and the candidate it tries beside it."""

    model: ServedModel | None
    candidate: Candidate | None


# A version that failed to load is tried again after this many checks, in case the failure was passing.
RETRY_REFUSED_AFTER = 10


class ModelWatcher(threading.Thread):
    """Keeps a worker on the version behind `production` and the candidate behind `shadow` or `canary`, with its
    share: a first load, then a check every `interval` seconds."""

    def __init__(self, service: Serving, settings: Settings, serving: ServingSettings) -> None:
        super().__init__(name="model-watcher", daemon=True)
        self.service = service
        self.interval = serving.reload_seconds
        self.fast, self.threads = serving.fast_path, serving.threads
        self.settings = settings
        self._registry = None  # opened on first use, so an unreachable store cannot stop a worker from starting
        self.refused: dict[str, int] = {}  # version → checks left before trying it again
        self.packed_tried = False
        self.candidate_retry = 0  # checks left before loading again a candidate that did not load
        self.problem: str | None = None  # the rollout state's last problem, warned about when it changes
        # Why no model serves, while none does: what the 503 says (the error itself is in the log, not in answers).
        self.unserved = NOTHING_PROMOTED
        # The version `production` names that did not load, while this worker answers with another or none (/model).
        self.not_loaded: dict[str, str] | None = None
        self.stopped = threading.Event()

    @property
    def registry(self):
        if self._registry is None:
            from readmission_platform.lib.registry import ModelRegistry

            self._registry = ModelRegistry(self.settings.mlflow_tracking_uri, self.settings.mlflow_artifact_location)
        return self._registry

    def run(self) -> None:
        while not self.stopped.wait(self.interval):
            self.check()

    def check(self) -> None:
        self._check()
        model = self.service.model
        READY.set(model is not None)
        if model is not None and (rate := model.info.get("validation_metrics", {}).get("positive_rate")) is not None:
            VALIDATION_POSITIVE_RATE.labels(model_version=model.version).set(rate)

    def _check(self) -> None:
        try:
            state = rollout_state(self.registry)
        except Exception as error:  # the registry's database is unreachable: production and candidate stay as they are
            log.warning("cannot read the rollout aliases from %s: %s", masked(self.settings.mlflow_tracking_uri), error)
            state = None
            self.unserved = "the model registry cannot be read, and no model is packed here (see the service's log)"
        self._check_production(state.production if state is not None else None, state_read=state is not None)
        if state is not None:
            self._check_candidate(state)

    def _check_production(self, version: str | None, *, state_read: bool = True) -> None:
        current = self.service.model
        if state_read and (self.not_loaded or {}).get("version") != version:
            self.not_loaded = None  # production names another version now
        if version is None:
            if current is None and not self.packed_tried:
                self.packed_tried = True  # once: it is packed in the Bento and does not change
                self.service.model = _packed_model(self.fast, self.threads)
            if state_read:
                self.unserved = NOTHING_PROMOTED
            return
        if current is not None and current.version == version:
            return
        candidate = self.service.candidate
        if candidate is not None and candidate.version == version and candidate.model is not None:
            # The candidate moved to production: the model this worker has tried on live requests, not a new load.
            self.service.model = candidate.model
            self.service.candidate = None
            RELOADS.labels(outcome="loaded").inc()
            log.info("now serving version %s of %s, the %s it held (was %s)", version, candidate.model.name,
                     candidate.stage, current.version if current else "none")  # fmt: skip
            return
        if self.refused.get(version, 0) > 0:
            self.refused[version] -= 1
            return
        try:
            model = load_version(self.registry, version, fast=self.fast, threads=self.threads)
        except Exception as error:
            RELOADS.labels(outcome="failed").inc()
            self.refused[version] = RETRY_REFUSED_AFTER
            log.error("version %s stays unserved, %s: %s", version,
                      f"version {current.version} keeps serving" if current else "no model serves", error)  # fmt: skip
            why = f"did not load (see the service's log); tried again in {RETRY_REFUSED_AFTER} checks"
            self.not_loaded = {"version": version, "error": why}
            self.unserved = f"version {version} is promoted to 'production' but {why}"
            return
        self.service.model = model
        self.not_loaded = None
        self.refused.pop(version, None)
        RELOADS.labels(outcome="loaded").inc()
        log.info("now serving version %s of %s (was %s)", version, model.name, current.version if current else "none")

    def _check_candidate(self, state: RolloutState) -> None:
        """Hold the version behind `shadow` or `canary` (at most one), with its stage and share; none without."""
        current: Candidate | None = self.service.candidate
        if state.problem and state.problem != self.problem:
            log.warning("%s", state.problem)
        self.problem = state.problem
        if state.candidate is None or state.stage is None:
            if current is not None:
                self.service.candidate = None
                log.info("%s version %s withdrawn: production alone answers", current.stage, current.version)
            return
        if current is not None and current.version == state.candidate:
            retry = current.model is None and self.candidate_retry <= 0
            if not retry:
                self.candidate_retry -= 1
                if (current.stage, current.share) != (state.stage, state.share):
                    self.service.candidate = replace(current, stage=state.stage, share=state.share)
                    count_failures_of(self.service.candidate)
                    log.info("version %s is now %s%s (was %s%s)", current.version, state.stage, _share(state),
                             current.stage, _share(current))  # fmt: skip
                return
        try:
            model, error = load_version(self.registry, state.candidate, fast=self.fast, threads=self.threads), None
        except Exception as failed:
            model, error = None, str(failed)
            self.candidate_retry = RETRY_REFUSED_AFTER
            log.error("%s version %s did not load; production answers its requests: %s", state.stage, state.candidate, error)
        self.service.candidate = Candidate(state.candidate, state.stage, state.share, model, error)
        count_failures_of(self.service.candidate)
        if model is not None:
            log.info("%s version %s loaded%s; production version %s answers %s", state.stage, state.candidate,
                     _share(state), state.production, "every request" if state.stage == SHADOW else "the rest")  # fmt: skip


def _share(state: RolloutState | Candidate) -> str:
    return f" for {state.share:.0%} of requests" if state.stage == CANARY else ""


def _packed_model(fast: bool, threads: int) -> ServedModel | None:
    """The model packed in this Bento (or BentoML's model store), for when the registry has none to give."""
    try:
        packed = bentoml.models.get(f"{PACKED_MODEL}:latest")
    except bentoml.exceptions.NotFound:
        return None
    import mlflow.sklearn

    try:
        info = json.loads(packed.info.metadata["info"]) | {"served_from": f"BentoML model {packed.tag}"}
        model = serve(mlflow.sklearn.load_model(packed.path_of(MLFLOW_MODEL_FOLDER)), info, fast=fast, threads=threads)
    except Exception as error:
        RELOADS.labels(outcome="failed").inc()
        log.error("the packed model %s cannot serve: %s", packed.tag, error)
        return None
    RELOADS.labels(outcome="loaded").inc()
    log.info("serving the packed model %s (version %s): the registry has no 'production' version to give", packed.tag,
             model.version)  # fmt: skip
    return model

