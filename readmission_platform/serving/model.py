"""The model a serving worker answers with: one registered version, its fast scorer, threshold and facts.

A version's fast path (`serving.fast`) is pinned to its own pipeline on a few encounters and on every category its
encoders know; one that fails the pin is left out, logged, and the version is scored through the pipeline. A version
is only served after a smoke test: every probability must be a number in [0, 1]. One that fails is refused with
`ModelRefused`.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import numpy as np
import polars as pl
from sklearn.pipeline import Pipeline

from readmission_platform.lib import schema
from readmission_platform.lib.encounter import features_frame
from readmission_platform.lib.history import STATE_SCHEMA
from readmission_platform.lib.model_card import read_card
from readmission_platform.lib.registry import ModelRegistry, RegistryError, decision_threshold, trained_batches
from readmission_platform.lib.reporting import masked
from readmission_platform.lib.training import predict_probability
from readmission_platform.serving.fast import FastScorer, UnsupportedModel, compile, pin

log = logging.getLogger(__name__)

LOW, MEDIUM, HIGH = "low", "medium", "high"
RISK_BANDS = (LOW, MEDIUM, HIGH)

# Encounters of the data set's shape (no identifiers) that every version must score before it serves.
_BASE = {
    "race": "Caucasian", "gender": "Female", "age": "[70-80)", "weight": None, "admission_type_id": 1,
    "discharge_disposition_id": 1, "admission_source_id": 7, "time_in_hospital": 4, "payer_code": "MC",
    "medical_specialty": "InternalMedicine", "num_lab_procedures": 45, "num_procedures": 1, "num_medications": 16,
    "number_outpatient": 0, "number_emergency": 0, "number_inpatient": 1, "diag_1": "428", "diag_2": "250.02",
    "diag_3": "401", "number_diagnoses": 9, "max_glu_serum": "None", "A1Cresult": ">8",
} | {name: "No" for name in schema.MEDICATIONS} | {
    "metformin": "Steady", "insulin": "Up", "change": "Ch", "diabetesMed": "Yes",
}  # fmt: skip
SMOKE_ENCOUNTERS: tuple[dict[str, Any], ...] = (
    _BASE,
    _BASE | {"race": None, "gender": "Male", "age": "[40-50)", "payer_code": None, "medical_specialty": None,
             "diag_1": "V57", "diag_2": None, "diag_3": None, "A1Cresult": "None", "insulin": "No", "change": "No",
             "number_inpatient": 6, "number_emergency": 3, "weight": "[75-100)"},
    _BASE | {"medical_specialty": "Surgery-Vascular", "admission_type_id": 3, "discharge_disposition_id": 3,
             "diag_1": "996.81", "diag_2": "E878", "max_glu_serum": ">300", "metformin": "Down", "insulin": "Steady"},
)  # fmt: skip


# Their patients' history: none known, a returning patient, a frequent one (`history.STATE`), so the fast path's pin
# covers the history features too.
SMOKE_STATES = pl.DataFrame(
    [(None,) * len(STATE_SCHEMA), (1, 3, 0, 1, 2, 12, 40, 7, 0), (6, 30, 2, 0, 9, 25, 70, 9, 4)],
    schema=STATE_SCHEMA, orient="row",
)  # fmt: skip


class ModelRefused(RegistryError):
    """A version that cannot serve: it does not load, or fails the smoke test."""


@dataclass(frozen=True)
class ServedModel:
    """A loaded version and everything an answer names: version, threshold, risk bands, facts for /model."""

    name: str
    version: str
    threshold: float
    base_rate: float  # the validation rate of readmission: the line between low and medium risk
    pipeline: Pipeline
    scorer: FastScorer | None  # None: no fast path for this pipeline; one-row frames through the pipeline instead
    info: dict[str, Any] = field(default_factory=dict)
    loaded_at: str = field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))

    def probability(self, features: Mapping[str, float | str]) -> float:
        if self.scorer is not None:
            return self.scorer.probability(features)
        return float(predict_probability(self.pipeline, pl.DataFrame([features]))[0])

    def probabilities(self, frame: pl.DataFrame) -> np.ndarray:
        """The probabilities of every row of a features-table frame."""
        if frame.is_empty():  # every row of a batch out of scope or routed to a canary: the pipeline refuses 0 rows
            return np.empty(0)
        if self.scorer is not None:
            return self.scorer.probabilities(frame)
        return predict_probability(self.pipeline, frame)

    def risk_bands(self, probabilities: np.ndarray) -> np.ndarray:
        """high: flagged (at or above the threshold); medium: above the base rate; low: at most the base rate."""
        band = np.where(probabilities >= self.threshold, 2, probabilities > self.base_rate)
        return np.asarray(RISK_BANDS)[band]

    def risk_band(self, probability: float) -> str:
        """`risk_bands` of one probability, by comparing numbers (a one-element array cost /predict more than this)."""
        return RISK_BANDS[2 if probability >= self.threshold else 1 if probability > self.base_rate else 0]

    @property
    def method(self) -> str:
        return self.scorer.method if self.scorer is not None else "none: this model has no fast path to explain with"

    def smoke_test(self) -> float:
        """Score `SMOKE_ENCOUNTERS`: the fast path must agree with the pipeline (`fast.pin`) and every probability
        must be a number in [0, 1]; `ModelRefused` otherwise. Returns the largest difference found."""
        frame = features_frame(list(SMOKE_ENCOUNTERS), SMOKE_STATES)
        try:
            worst = pin(self.scorer, self.pipeline, frame) if self.scorer is not None else 0.0
            probabilities = self.probabilities(frame)
        except UnsupportedModel as error:
            raise ModelRefused(f"version {self.version} fails the smoke test: {error}") from error
        except Exception as error:
            raise ModelRefused(f"version {self.version} fails to score the smoke encounters: {error!r}") from error
        if not np.all((probabilities >= 0.0) & (probabilities <= 1.0)):
            raise ModelRefused(
                f"version {self.version} fails the smoke test: probabilities {probabilities.tolist()}; expected numbers in [0, 1]"
            )
        return worst


def describe(registry: ModelRegistry, version: str) -> dict[str, Any]:
    """What /model tells of a version: lineage, threshold, validation and test metrics, promotion history, and its model
    card (None until promotion_decision has scored it on test)."""
    found = registry.version(version)
    run = registry.client.get_run(found.run_id)
    metrics = run.data.metrics
    tags = found.tags
    return {
        "name": found.name,
        "version": str(found.version),
        "aliases": list(found.aliases),
        "run_id": found.run_id,
        "family": tags.get("family"),
        "threshold": decision_threshold(found),
        "base_rate": metrics.get("validation_observed_rate"),
        "trained_at": tags.get("trained_at"),
        "trained_batches": trained_batches(found),
        "training_rows": {k.removesuffix("_rows"): int(v) for k, v in tags.items() if k.endswith("_rows")},
        "registered_at": datetime.fromtimestamp(found.creation_timestamp / 1000, UTC).isoformat(timespec="seconds"),
        "promoted_at": tags.get("promoted_at"),
        "promotion_reason": tags.get("promotion_reason"),
        "test_metrics": {k.removeprefix("test_"): v for k, v in sorted(metrics.items()) if k.startswith("test_")},
        "validation_metrics": {
            k.removeprefix("validation_"): v for k, v in sorted(metrics.items()) if k.startswith("validation_")
        },
        "model_card": read_card(registry.client, found.run_id),
    }


def serve(pipeline: Pipeline, info: Mapping[str, Any], *, fast: bool = True, threads: int | None = None) -> ServedModel:
    """A loaded pipeline and its facts (`describe`) → a model that passed the smoke test.

    `fast=False` scores single encounters through the pipeline itself (READMISSION_FAST_PATH=0 in the service): a
    switch to rule the fast path out when diagnosing, and the baseline of the load test. A fast path that fails its
    pin takes the same way, named in the log. `threads`: threads that share a batch (`fast.compile`).
    """
    try:
        if not fast:
            raise UnsupportedModel("the fast path is switched off (READMISSION_FAST_PATH=0)")
        scorer: FastScorer | None = compile(pipeline, pin_on=features_frame(list(SMOKE_ENCOUNTERS), SMOKE_STATES), threads=threads)
    except UnsupportedModel as error:
        log.warning("version %s has no fast path (%s); it is scored through the pipeline", info["version"], error)
        scorer = None
    base_rate = info.get("base_rate")
    model = ServedModel(
        name=info["name"],
        version=str(info["version"]),
        threshold=float(info["threshold"]),
        base_rate=float(base_rate) if base_rate is not None and math.isfinite(base_rate) else 0.0,
        pipeline=pipeline,
        scorer=scorer,
        info=dict(info),
    )
    model.smoke_test()
    return model


def load_version(registry: ModelRegistry, version: str, *, fast: bool = True, threads: int | None = None) -> ServedModel:
    """A registered version, loaded from the MLflow store and smoke-tested; `ModelRefused` if it cannot serve."""
    started = time.perf_counter()
    try:
        info = describe(registry, version) | {"served_from": f"MLflow registry {masked(registry.tracking_uri)}"}
        pipeline = registry.load_model(version)
    except RegistryError as error:
        raise ModelRefused(str(error)) from error
    model = serve(pipeline, info, fast=fast, threads=threads)
    log.info("loaded version %s of %s in %.1f s", version, model.name, time.perf_counter() - started)
    return model
