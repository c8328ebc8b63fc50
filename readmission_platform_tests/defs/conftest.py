"""Fixtures for the Dagster layer: a landing folder and a warehouse per test, on DuckDB and PostgreSQL; an MLflow store;
real batches; and the ingest and retrain runs the stage tests materialize."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import dagster as dg
import pytest

from readmission_platform.defs.ingestion.assets import batch_tables
from readmission_platform.defs.monitoring import checks as monitoring_checks
from readmission_platform.defs.monitoring.assets import batch_drift
from readmission_platform.defs.partitions import batches
from readmission_platform.defs.promotion import checks as promotion_checks
from readmission_platform.defs.promotion.assets import promotion_decision
from readmission_platform.defs.resources import LandingResource, MlflowResource, RetrainPolicy, WarehouseResource
from readmission_platform.defs.training import checks as training_checks
from readmission_platform.defs.training.assets import trained_model, training_set
from readmission_platform.lib.landing import split_batches
from readmission_platform.lib.warehouse import Warehouse, open_warehouse


@dataclass
class Platform:
    landing: Path
    warehouse_url: str

    @property
    def resources(self) -> dict:
        return {
            "landing": LandingResource(folder=str(self.landing)),
            "warehouse": WarehouseResource(url=self.warehouse_url),
        }

    @property
    def warehouse(self) -> Warehouse:
        return open_warehouse(self.warehouse_url)

    def drop(self, name: str, data: bytes) -> Path:
        path = self.landing / name
        path.write_bytes(data)
        return path


@pytest.fixture(params=["duckdb", pytest.param("postgres", marks=pytest.mark.postgres)])
def platform(request, tmp_path: Path) -> Platform:
    landing = tmp_path / "landing"
    landing.mkdir()
    if request.param == "duckdb":
        return Platform(landing, f"duckdb:///{tmp_path / 'warehouse.duckdb'}")
    return Platform(landing, request.getfixturevalue("pg_schema_url"))


@pytest.fixture
def instance():
    with dg.DagsterInstance.ephemeral() as instance:
        yield instance


BATCH = 3_000
INGEST = [batch_tables, batch_drift]
RETRAIN = [training_set, trained_model, promotion_decision]
CHECKS = dg.load_asset_checks_from_modules([monitoring_checks, training_checks, promotion_checks])
TWO_FAMILIES = {"ops": {"trained_model": {"config": {"families": ["logistic_regression", "hist_gradient_boosting"]}}}}
# Where the family does not matter: the linear model trains and is scored in a fraction of the boosting's time.
FAST = {"ops": {"trained_model": {"config": {"families": ["logistic_regression"]}}}}


@pytest.fixture(scope="module")
def training_batches(full_source_bytes) -> list[bytes]:
    """Four batches of 3,000 real encounters: enough rows for a model that clears the gates."""
    lines = full_source_bytes.splitlines(keepends=True)
    return split_batches(b"".join(lines[: 4 * BATCH + 1]), BATCH)


@pytest.fixture
def mlflow(tmp_path, new_mlflow_store) -> MlflowResource:
    return MlflowResource(tracking_uri=new_mlflow_store(tmp_path / "mlflow.db"), artifact_root=(tmp_path / "artifacts").as_uri())


@pytest.fixture
def resources(platform, mlflow) -> dict:
    return platform.resources | {"mlflow": mlflow, "retrain_policy": RetrainPolicy()}


def ingest(platform, instance, resources, data: bytes, batch_id: str) -> dg.ExecuteInProcessResult:
    platform.drop(f"{batch_id}.csv", data)
    instance.add_dynamic_partitions(batches.name, [batch_id])
    checks = [c for c in CHECKS if c.check_key.asset_key in {key for a in INGEST for key in a.keys}]
    return dg.materialize(INGEST + checks, partition_key=batch_id, resources=resources, instance=instance)


def retrain(instance, resources, run_config=FAST, raise_on_error=True) -> dg.ExecuteInProcessResult:
    checks = [c for c in CHECKS if c.check_key.asset_key in {a.key for a in RETRAIN}]
    return dg.materialize(
        [*RETRAIN, *checks, batch_tables],
        selection=RETRAIN,
        resources=resources,
        instance=instance,
        run_config=run_config,
        raise_on_error=raise_on_error,
    )


def metadata(result, asset: str) -> dict:
    event = result.asset_materializations_for_node(asset)[0]
    return {k: getattr(v, "value", v) for k, v in event.metadata.items()}


def checks_of(result) -> dict[str, dg.AssetCheckEvaluation]:
    return {e.check_name: e for e in result.get_asset_check_evaluations()}


@pytest.fixture(scope="module")
def steady_batches(full_source_bytes) -> list[bytes]:
    """Four batches of 3,000 real encounters from the file's later years, when recording had settled (README, Drift)."""
    lines = full_source_bytes.splitlines(keepends=True)
    return split_batches(b"".join([lines[0], *lines[75_001 : 75_001 + 4 * BATCH]]), BATCH)
