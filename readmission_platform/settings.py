"""Where the platform keeps its state, read once from the environment at the edge (definitions, CLI)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

# What the platform creates holds patient identifiers and clinical values: its user's alone (files 0600, folders 0700).
PRIVATE_UMASK = 0o077


@dataclass(frozen=True)
class Settings:
    home: Path
    warehouse_url: str
    source: Path | None
    dagster_storage_url: str | None
    mlflow_tracking_uri: str
    prediction_log_url: str
    # Setting → the variable whose text it is; settings left to their defaults are not in it.
    variables: Mapping[str, str] = field(default_factory=dict, compare=False)

    @property
    def landing_dir(self) -> Path:
        return self.home / "landing"

    @property
    def dagster_home(self) -> Path:
        return self.home / "dagster"

    @property
    def mlflow_dir(self) -> Path:
        return self.home / "mlflow"

    @property
    def mlflow_artifact_root(self) -> Path:
        return self.mlflow_dir / "artifacts"

    @property
    def bentoml_home(self) -> Path:
        """BentoML's model and Bento stores (BENTOML_HOME for every bentoml command the platform runs)."""
        return self.home / "bentoml"

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> Settings:
        """READMISSION_HOME (default ./.readmission), READMISSION_WAREHOUSE_URL (default its DuckDB file),
        READMISSION_SOURCE (default the bundled data set), READMISSION_DAGSTER_STORAGE_URL (default SQLite),
        READMISSION_MLFLOW_TRACKING_URI or else MLFLOW_TRACKING_URI (default SQLite under the home),
        READMISSION_PREDICTION_LOG_URL (default SQLite under the home)."""
        home = Path(env.get("READMISSION_HOME") or ".readmission").expanduser().resolve()
        source = env.get("READMISSION_SOURCE")
        variables: dict[str, str] = {}

        def given(setting: str, *names: str) -> str | None:
            """The first of the variables `names` that is set, noted as the one behind `setting`."""
            for name in names:
                if env.get(name):
                    variables[setting] = name
                    return env[name]
            return None

        return cls(
            home=home,
            warehouse_url=given("warehouse_url", "READMISSION_WAREHOUSE_URL") or f"duckdb:///{home / 'warehouse.duckdb'}",
            source=Path(source).expanduser().resolve() if source else None,
            dagster_storage_url=given("dagster_storage_url", "READMISSION_DAGSTER_STORAGE_URL"),
            mlflow_tracking_uri=given("mlflow_tracking_uri", "READMISSION_MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_URI")
            or f"sqlite:///{home / 'mlflow' / 'mlflow.db'}",
            prediction_log_url=given("prediction_log_url", "READMISSION_PREDICTION_LOG_URL")
            or f"sqlite:///{home / 'predictions.sqlite'}",
            variables=variables,
        )


def keep_private(home: Path | None = None) -> None:
    """From now on this process and its children create files 0600 and folders 0700, whatever umask they inherited;
    `home`, if given, is made (or narrowed to) 0700, so that what an older version left there is out of others' reach."""
    os.umask(PRIVATE_UMASK)
    if home is not None:
        home.mkdir(parents=True, exist_ok=True)
        home.chmod(0o700)
