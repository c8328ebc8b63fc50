"""The Dagster instance the platform configures: the repository's dagster.yaml, SQLite or PostgreSQL storage."""

from __future__ import annotations

import dagster as dg
import psycopg
import pytest
import yaml

from readmission_platform.cli.instance import INSTANCE_CONFIGS, prepare_dagster_home
from readmission_platform.defs.ingestion.assets import batch_tables
from readmission_platform.defs.partitions import batches
from readmission_platform.defs.resources import LandingResource, WarehouseResource
from readmission_platform.settings import Settings


def settings_for(tmp_path, storage_url=None) -> Settings:
    return Settings(
        home=tmp_path,
        warehouse_url=f"duckdb:///{tmp_path / 'warehouse.duckdb'}",
        source=None,
        dagster_storage_url=storage_url,
        mlflow_tracking_uri=f"sqlite:///{tmp_path / 'mlflow' / 'mlflow.db'}",
        prediction_log_url=f"sqlite:///{tmp_path / 'predictions.sqlite'}",
    )


def ingest_one_batch(instance, settings, data: bytes) -> dg.ExecuteInProcessResult:
    settings.landing_dir.mkdir(parents=True, exist_ok=True)
    (settings.landing_dir / "batch_0001.csv").write_bytes(data)
    instance.add_dynamic_partitions(batches.name, ["batch_0001"])
    return dg.materialize(
        [batch_tables],
        partition_key="batch_0001",
        instance=instance,
        resources={
            "landing": LandingResource(folder=str(settings.landing_dir)),
            "warehouse": WarehouseResource(url=settings.warehouse_url),
        },
    )


def test_the_default_instance_is_sqlite_under_readmission_home_with_one_warehouse_slot(
    tmp_path, monkeypatch, sample_batches
):
    monkeypatch.setenv("DAGSTER_HOME", "unset")
    settings = settings_for(tmp_path)

    home = prepare_dagster_home(settings)

    assert home == tmp_path / "dagster"
    assert (home / "dagster.yaml").resolve() == INSTANCE_CONFIGS["sqlite"].resolve()
    with dg.DagsterInstance.get() as instance:
        assert type(instance.run_storage).__name__ == "SqliteRunStorage"
        assert instance.get_concurrency_config().pool_config.default_pool_limit == 1
        assert ingest_one_batch(instance, settings, sample_batches[0]).success
    with dg.DagsterInstance.get() as reopened:  # state survives the process's instance
        assert reopened.get_dynamic_partitions(batches.name) == ["batch_0001"]
        assert len(reopened.get_runs()) == 1


@pytest.mark.postgres
def test_with_a_storage_url_runs_and_partitions_live_in_postgresql(tmp_path, monkeypatch, postgres_url, sample_batches):
    monkeypatch.setenv("DAGSTER_HOME", "unset")
    monkeypatch.setenv("READMISSION_DAGSTER_STORAGE_URL", postgres_url)
    settings = settings_for(tmp_path, postgres_url)

    home = prepare_dagster_home(settings)

    assert (home / "dagster.yaml").resolve() == INSTANCE_CONFIGS["postgres"].resolve()
    with dg.DagsterInstance.get() as instance:
        assert type(instance.run_storage).__name__ == "PostgresRunStorage"
        assert ingest_one_batch(instance, settings, sample_batches[0]).success
        run_id = instance.get_runs()[0].run_id
    with psycopg.connect(postgres_url) as connection:
        stored_runs = connection.execute("SELECT run_id FROM runs").fetchall()
        partitions = connection.execute("SELECT partition FROM dynamic_partitions").fetchall()
    assert (run_id,) in stored_runs
    assert ("batch_0001",) in partitions


def test_switching_back_to_sqlite_relinks_the_configuration(tmp_path, monkeypatch):
    monkeypatch.setenv("DAGSTER_HOME", "unset")
    prepare_dagster_home(settings_for(tmp_path, "postgresql://elsewhere/db"))
    home = prepare_dagster_home(settings_for(tmp_path))
    assert (home / "dagster.yaml").resolve() == INSTANCE_CONFIGS["sqlite"].resolve()


def test_the_instance_frees_a_dead_runs_slots_and_retries_crashes_not_failed_assets(tmp_path, monkeypatch):
    monkeypatch.setenv("DAGSTER_HOME", "unset")
    prepare_dagster_home(settings_for(tmp_path))

    with dg.DagsterInstance.get() as instance:
        assert instance.run_monitoring_enabled
        assert instance.run_monitoring_settings.get("free_slots_after_run_end_seconds", 0) > 0
        assert instance.run_retries_enabled and instance.run_retries_max_retries >= 1
        assert not instance.run_retries_retry_on_asset_or_op_failure


def test_the_postgresql_instance_config_is_the_sqlite_one_with_postgresql_storage():
    sqlite = yaml.safe_load(INSTANCE_CONFIGS["sqlite"].read_text())
    postgres = yaml.safe_load(INSTANCE_CONFIGS["postgres"].read_text())

    assert set(postgres.pop("storage")) == {"postgres"}
    assert postgres == sqlite
