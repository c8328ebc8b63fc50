"""A platform home whose registry serves a LightGBM model (the family retraining promotes) trained on the full data
set, and real test-split encounters as a hospital system would send them: what the serving benchmarks run against."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import polars as pl

from readmission_platform.lib.cleaning import clean
from readmission_platform.lib.encounter import from_clean
from readmission_platform.lib.features import build_features
from readmission_platform.lib.ingest import parse_batch
from readmission_platform.lib.pipeline import NOTHING_LOADED
from readmission_platform.lib.registry import ModelRegistry
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


def prepare(home: Path, encounters: int = 10_000) -> ServingSetup:
    parsed = parse_batch(read_source_bytes(), batch_id="all", source_file="all.csv", loaded_elsewhere=NOTHING_LOADED, now=datetime.now(UTC))
    cleaned = clean(parsed.rows).frame
    features = assign_split(build_features(cleaned))
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
    return ServingSetup(settings, candidate, [from_clean(r) for r in clean_rows.iter_rows(named=True)], rows)
