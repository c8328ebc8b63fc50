"""A platform home whose registry serves a LightGBM model (the family retraining promotes) trained on the full data
set, and real test-split encounters as a hospital system would send them: what the serving benchmarks run against."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import httpx
import polars as pl

from readmission_platform.lib.cleaning import clean
from readmission_platform.lib.encounter import from_clean
from readmission_platform.lib.features import build_features
from readmission_platform.lib.history import with_history
from readmission_platform.lib.ingest import parse_batch
from readmission_platform.lib.pipeline import NOTHING_LOADED
from readmission_platform.lib.registry import SHADOW, ModelRegistry
from readmission_platform.lib.source import read_source_bytes
from readmission_platform.lib.splitting import SPLIT, assign_split
from readmission_platform.lib.training import LIGHTGBM, Candidate, model_input, train_candidates
from readmission_platform.settings import Settings

logging.getLogger("mlflow").setLevel(logging.WARNING)


@dataclass
class ServingSetup:
    settings: Settings
    candidate: Candidate
    encounters: list[dict]  # test-split encounters as requests
    rows: pl.DataFrame  # the same encounters as feature-table rows
    run_id: str = ""

    @property
    def registry(self) -> ModelRegistry:
        return ModelRegistry(self.settings.mlflow_tracking_uri, self.settings.mlflow_artifact_root.as_uri())

    def set_shadow(self, on: bool) -> str | None:
        """Put a second version of the same model behind `shadow` (registered on first use), or take it away: a
        shadow that costs what production does, the costliest a candidate of the same family can be."""
        registry = self.registry
        if not on:
            if SHADOW in registry.client.get_registered_model(registry.model_name).aliases:
                registry.client.delete_registered_model_alias(registry.model_name, SHADOW)
            return None
        found = registry.client.get_registered_model(registry.model_name).aliases.get(SHADOW)
        version = found or registry.register(self.run_id, threshold=self.candidate.threshold,
                                             tags={"family": self.candidate.family, "batch_ids": "all"})  # fmt: skip
        registry.client.set_registered_model_alias(registry.model_name, SHADOW, version)
        return version


def prepare(home: Path, encounters: int = 10_000) -> ServingSetup:
    parsed = parse_batch(read_source_bytes(), batch_id="all", source_file="all.csv", loaded_elsewhere=NOTHING_LOADED, now=datetime.now(UTC))
    cleaned = clean(parsed.rows).frame
    # Every feature the models take, the patients' history among them, as the training set computes it.
    features = assign_split(with_history(build_features(cleaned), parsed.rows))
    part = {name: features.filter(pl.col(SPLIT) == name) for name in ("train", "validation", "test")}
    (candidate,) = train_candidates(part["train"], part["validation"], families=(LIGHTGBM,))
    settings = Settings.from_env({"READMISSION_HOME": str(home)})
    registry = ModelRegistry(settings.mlflow_tracking_uri, settings.mlflow_artifact_root.as_uri())
    run_id = registry.log_candidate(
        candidate.model, params=candidate.params, metrics={f"validation_{k}": v for k, v in candidate.validation.items()},
        tags={"batch_ids": "all"}, artifacts=None, input_example=model_input(part["train"].head(5)), run_name="bench",
    )  # fmt: skip
    version = registry.register(run_id, threshold=candidate.threshold, tags={"family": candidate.family, "batch_ids": "all"})
    registry.promote(version, reason="serving benchmark")
    rows = part["test"].head(encounters)
    clean_rows = rows.select("encounter_id").join(cleaned, on="encounter_id", how="left", maintain_order="left")
    return ServingSetup(settings, candidate, [from_clean(r) for r in clean_rows.iter_rows(named=True)], rows, run_id)


def wait_for_candidate(url: str, version: str | None, within: float = 120.0) -> None:
    """Wait until the worker(s) at `url` hold `version` as their loaded candidate (None: no candidate)."""
    deadline = time.monotonic() + within
    while True:
        candidate = httpx.get(f"{url}/model", timeout=30).json().get("candidate")
        if (candidate is None and version is None) or (candidate and candidate["version"] == version and candidate["loaded"]):
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"the service at {url} did not take candidate {version} within {within:.0f} s: {candidate}")
        time.sleep(0.5)
