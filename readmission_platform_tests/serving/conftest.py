"""A platform home with a model registry holding real candidates, and `bentoml serve` started on it."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx
import polars as pl
import pytest

from readmission_platform.lib.encounter import from_clean
from readmission_platform.lib.history import HISTORY_FEATURES
from readmission_platform.lib.predictions import read_predictions
from readmission_platform.lib.registry import ModelRegistry
from readmission_platform.lib.training import Candidate, model_input
from readmission_platform.serving.server import running_server
from readmission_platform.settings import Settings


def settings_in(home: Path, **env: str) -> Settings:
    return Settings.from_env({"READMISSION_HOME": str(home), **env})


@pytest.fixture(scope="session")
def new_home(new_mlflow_store):
    """The settings of a platform home in a folder, with an empty MLflow store made there."""

    def make(home: Path) -> Settings:
        settings = settings_in(home)
        new_mlflow_store(settings.mlflow_dir / "mlflow.db")
        return settings

    return make


def logged_once(url: str, columns: Sequence[str], done: Callable[[pl.DataFrame], bool], what: str, seconds: float = 20) -> pl.DataFrame:
    """The prediction log's `columns` once `done` holds for them: the service writes its rows from a queue, a moment
    after it answers. Fails naming `what` if they do not get there within `seconds`."""
    deadline = time.monotonic() + seconds
    while not done(logged := read_predictions(url, columns)):
        assert time.monotonic() < deadline, f"{what} never reached the prediction log"
        time.sleep(0.2)
    return logged


def registry_of(settings: Settings) -> ModelRegistry:
    return ModelRegistry(settings.mlflow_tracking_uri, settings.mlflow_artifact_root.as_uri())


def register(registry: ModelRegistry, candidate: Candidate, parts: dict[str, pl.DataFrame], *, promote: bool) -> str:
    """Log and register a candidate as trained_model does, with test metrics as promotion_decision logs them."""
    tags = {"batch_ids": "batch_0001,batch_0002", "trained_at": "2026-11-22T06:00:00+00:00",
            **{f"{name}_rows": str(part.height) for name, part in parts.items()}}  # fmt: skip
    run_id = registry.log_candidate(
        candidate.model,
        params={"family": candidate.family, **candidate.params},
        metrics={f"validation_{k}": v for k, v in candidate.validation.items()} | {"test_roc_auc": 0.66, "test_brier": 0.09},
        tags=tags,
        artifacts=None,
        input_example=model_input(parts["train"].head(5)),
        run_name=candidate.family,
    )
    version = registry.register(run_id, threshold=candidate.threshold, tags=tags | {"family": candidate.family})
    if promote:
        registry.promote(version, reason=f"test: serve {candidate.family}")
    return version


def break_artifacts(registry: ModelRegistry, version: str) -> None:
    """Overwrite the stored model of a version with bytes no loader accepts."""
    location = registry.client.get_model_version_download_uri(registry.model_name, version)
    folder = Path(location.removeprefix("file://"))
    for model_file in folder.rglob("model.skops"):
        model_file.write_bytes(b"not a model")


@pytest.fixture(scope="session")
def test_encounters(full_features, full_clean) -> tuple[list[dict], pl.DataFrame]:
    """1,000 test-split encounters outside the training sample: as requests (without a patient_id), and as
    feature-table rows with the history the service then uses, a first encounter's."""
    rows = (
        full_features.slice(20_000).filter(pl.col("split") == "test").head(1_000)
        .with_columns(pl.lit(0.0).alias(name) for name in HISTORY_FEATURES)
    )  # fmt: skip
    clean_rows = rows.select("encounter_id").join(full_clean.frame, on="encounter_id", how="left", maintain_order="left")
    return [from_clean(r) for r in clean_rows.iter_rows(named=True)], rows


TOKEN = "gate-token"


@dataclass
class GatedServer:
    url: str
    log_path: Path
    settings: Settings
    client: httpx.Client  # sends the token


@pytest.fixture(scope="session")
def gated_server(tmp_path_factory, new_home, sample_candidates, sample_parts) -> Iterator[GatedServer]:
    """One `bentoml serve .` with a bearer token and the default body cap, shared by the tests of the service's edge."""
    settings = new_home(tmp_path_factory.mktemp("gated"))
    register(registry_of(settings), sample_candidates["hist_gradient_boosting"], sample_parts, promote=True)
    log_path = settings.home / "logs" / "gated.log"
    with running_server(settings, bento=None, env={"READMISSION_API_TOKEN": TOKEN}, log_path=log_path) as url:
        with httpx.Client(base_url=url, timeout=60, headers={"Authorization": f"Bearer {TOKEN}"}) as client:
            yield GatedServer(url, log_path, settings, client)
