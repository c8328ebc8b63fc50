"""Resources: the warehouse, the landing folder, MLflow, the prediction log and Alertmanager, configured once in
definitions.py."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING

import dagster as dg
import polars as pl

from readmission_platform.lib.drift import PSI_SIGNIFICANT
from readmission_platform.lib.landing import OUTCOMES_FOLDER
from readmission_platform.lib.predictions import newest_predictions, read_predictions
from readmission_platform.lib.splitting import SPLIT, SPLITS
from readmission_platform.lib.warehouse import Warehouse, open_warehouse
from readmission_platform.settings import DAGSTER_UI_PORT, MLFLOW_UI_PORT

if TYPE_CHECKING:
    from collections.abc import Sequence
    from datetime import datetime

    from readmission_platform.lib.registry import ModelRegistry
    from readmission_platform.lib.rollout import RolloutPolicy


class WarehouseResource(dg.ConfigurableResource):
    """The warehouse holding raw_batches, rejected_rows, clean_batches and features."""

    url: str

    def open(self) -> Warehouse:
        return open_warehouse(self.url)

    def training_parts(self) -> dict[str, pl.DataFrame]:
        """The stored training set's train, validation and test parts."""
        with self.open() as store:
            frame = store.read_table("training_set")
        return {name: frame.filter(pl.col(SPLIT) == name) for name in SPLITS}


class LandingResource(dg.ConfigurableResource):
    """The folder where upstream systems drop batch files, and outcome files in its `outcomes/`."""

    folder: str

    @property
    def path(self) -> Path:
        return Path(self.folder)

    @property
    def outcomes_path(self) -> Path:
        """Where files of outcomes land (`lib/outcomes`)."""
        return Path(self.folder) / OUTCOMES_FOLDER


class MlflowResource(dg.ConfigurableResource):
    """MLflow tracking and the model registry (SQLite under READMISSION_HOME by default)."""

    tracking_uri: str
    artifact_root: str | None = None
    model_name: str = "readmission-classifier"
    experiment: str = "readmission"
    ui_url: str = f"http://127.0.0.1:{MLFLOW_UI_PORT}"
    """Where `make mlflow-ui` serves the MLflow UI; links in asset metadata point there."""

    def registry(self) -> ModelRegistry:
        # MLflow and skops take seconds to import; every run and sensor process loads this module.
        from readmission_platform.lib.registry import ModelRegistry

        return ModelRegistry(
            self.tracking_uri, self.artifact_root, model_name=self.model_name, experiment=self.experiment, ui_url=self.ui_url
        )


class PredictionLogResource(dg.ConfigurableResource):
    """The service's prediction log: sqlite:///path (default under READMISSION_HOME) or postgresql://…; its database
    also holds the patients' history states the service looks up (`lib/history_store`)."""

    url: str
    patient_key: str | None = None
    """The key of the hash that stands for a patient identifier (READMISSION_PATIENT_KEY), as the service has it."""

    def engine(self):
        """An SQLAlchemy engine on the log's database."""
        from readmission_platform.serving.prediction_log import engine_for

        return engine_for(self.url, create=False)

    def read(
        self,
        columns: Sequence[str] | None = None,
        *,
        since: datetime | None = None,
        until: datetime | None = None,
        request_ids: Sequence[str] | None = None,
    ) -> pl.DataFrame:
        """The predictions made in [`since`, `until`), of `request_ids` if given, oldest first
        (`lib/predictions.read_predictions`)."""
        return read_predictions(self.url, columns, since=since, until=until, request_ids=request_ids)

    def newest(self, columns: Sequence[str]) -> pl.DataFrame:
        """The newest prediction (one row, or none yet) as `columns` (`lib/predictions.newest_predictions`)."""
        return newest_predictions(self.url, columns)


class ServingResource(dg.ConfigurableResource):
    """Where BentoML keeps packed models and built Bentos (READMISSION_HOME/bentoml by default)."""

    bentoml_home: str


class RetrainPolicy(dg.ConfigurableResource):
    """When the retrain sensor starts a retrain run."""

    min_new_batches: int = 1
    """Feature batches materialized since the production model was trained (default: one batch)."""
    min_new_rows: int = 1
    """Feature rows in those batches."""
    drift_psi_threshold: float = PSI_SIGNIFICANT
    """A batch whose largest population stability index reaches this drifted (0.25: significant shift)."""


class DegradationPolicy(dg.ConfigurableResource):
    """What the platform does when the serving version's live performance falls short (`live_performance_sensor`)."""

    auto_rollback: bool = False
    """Move `production` back by itself when the serving version is clearly worse live than the one it replaced;
    off, the rollback is proposed (a row of promotion_decisions) for a person to run `readmission rollback`."""


class RolloutPolicyResource(dg.ConfigurableResource):
    """How `rollout_sensor` moves a promoted challenger through shadow and canary (`lib/rollout.RolloutPolicy`); the
    steps, stage time and requests come from `settings.RolloutSettings`."""

    steps: list[float] = [0.10, 0.25, 0.50, 0.75, 1.00]
    """The canary's shares of requests, one step after another."""
    stage_seconds: float = 3600.0
    min_requests: int = 200
    max_error_share: float = 0.01
    max_candidate_ms: float = 200.0
    min_agreement: float = 0.8
    max_psi: float = PSI_SIGNIFICANT
    agreement_margin: float = 0.1

    def policy(self) -> RolloutPolicy:
        from readmission_platform.lib.rollout import RolloutPolicy

        return RolloutPolicy(
            steps=tuple(self.steps), stage_seconds=self.stage_seconds, min_requests=self.min_requests,
            max_error_share=self.max_error_share, max_candidate_ms=self.max_candidate_ms,
            min_agreement=self.min_agreement, max_psi=self.max_psi, agreement_margin=self.agreement_margin,
        )  # fmt: skip


class AlertmanagerResource(dg.ConfigurableResource):
    """Alertmanager's API, where the pipeline's sensors post alerts (READMISSION_ALERTMANAGER_URL; unset: none)."""

    url: str | None = None
    dagster_ui_url: str = f"http://127.0.0.1:{DAGSTER_UI_PORT}"
    """Where `make ui` serves the Dagster UI; an alert links its run there."""
    hold_seconds: int = 3600
    """How long a posted alert stays firing in Alertmanager: a failure is an event, not a state anyone clears."""

    def post(self, alerts: list[dict]) -> None:
        """POST alerts (`alert` documents) to /api/v2/alerts; an HTTP error raises, naming the URL."""
        import httpx

        response = httpx.post(f"{self.url.rstrip('/')}/api/v2/alerts", json=alerts, timeout=10)
        if response.status_code != 200:
            raise RuntimeError(f"Alertmanager at {self.url} refused the alerts: {response.status_code} {response.text}")

    def alert(self, name: str, severity: str, summary: str, runbook: str, *, labels: dict[str, str],
              description: str, run_id: str) -> dict:  # fmt: skip
        """One alert as Alertmanager's API takes it, firing from now for `hold_seconds`, linked to its run."""
        now = datetime.now(UTC)
        return {
            "labels": {"alertname": name, "severity": severity, "source": "dagster", **labels},
            "annotations": {"summary": summary, "description": description, "runbook_url": runbook},
            "startsAt": now.isoformat(),
            "endsAt": (now + timedelta(seconds=self.hold_seconds)).isoformat(),
            "generatorURL": f"{self.dagster_ui_url.rstrip('/')}/runs/{run_id}",
        }
