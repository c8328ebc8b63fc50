"""patient_history and the training set's history, across batches, through Dagster."""

import dagster as dg
import polars as pl
import pytest

from readmission_platform.defs.history.assets import patient_history
from readmission_platform.defs.history.sensors import history_sensor
from readmission_platform.defs.ingestion.assets import batch_tables
from readmission_platform.defs.resources import PredictionLogResource
from readmission_platform.defs.training.assets import training_set
from readmission_platform.lib.history import HISTORY_FEATURES, patient_keys
from readmission_platform.lib.history_store import read_states
from readmission_platform_tests.defs.conftest import ingest, metadata

KEY = "defs-history-key"


@pytest.fixture
def prediction_log(tmp_path) -> PredictionLogResource:
    return PredictionLogResource(url=f"sqlite:///{tmp_path / 'predictions.sqlite'}", patient_key=KEY)


@pytest.mark.parametrize("platform", ["duckdb"], indirect=True)
def test_history_reads_earlier_batches_and_the_service_store_gets_every_patient(platform, instance, resources, training_batches, prediction_log):
    for i, data in enumerate(training_batches[:2], start=1):
        ingest(platform, instance, resources, data, f"batch_{i:04d}")
    done = dg.materialize(
        [patient_history, training_set, batch_tables], selection=[patient_history, training_set],
        resources=resources | {"prediction_log": prediction_log}, instance=instance,
    )  # fmt: skip
    raw = platform.warehouse.read_table("raw_batches")
    version, states = read_states(prediction_log.engine())
    assert version == metadata(done, "patient_history")["store_version"] == 1
    assert sorted(states["patient_key"]) == sorted(patient_keys(raw["patient_nbr"].unique(), KEY.encode()))
    table = platform.warehouse.read_table("training_set")
    assert set(HISTORY_FEATURES) <= set(table.columns)
    # Patients of batch_0002 whose earlier encounters came in batch_0001 have them counted.
    first = set(raw.filter(pl.col("batch_id") == "batch_0001")["patient_nbr"].cast(pl.Int64))
    returning = table.filter((pl.col("batch_id") == "batch_0002") & pl.col("patient_nbr").is_in(list(first)))
    assert returning.height > 0 and (returning["history_prior_encounters"] > 0).all()


@pytest.mark.parametrize("platform", ["duckdb"], indirect=True)
def test_the_history_sensor_runs_once_per_state_of_the_loaded_batches(platform, instance, resources, training_batches, prediction_log):
    def tick(log):
        return history_sensor(dg.build_sensor_context(instance=instance, resources={"prediction_log": log}))

    assert isinstance(tick(prediction_log), dg.SkipReason)  # nothing loaded yet
    ingest(platform, instance, resources, training_batches[0], "batch_0001")
    first = tick(prediction_log)
    assert isinstance(first, dg.RunRequest) and tick(prediction_log).run_key == first.run_key
    keyless = tick(PredictionLogResource(url=prediction_log.url))
    assert isinstance(keyless, dg.SkipReason) and "READMISSION_PATIENT_KEY" in keyless.skip_message
    ingest(platform, instance, resources, training_batches[0], "batch_0001")  # the batch loaded again
    assert tick(prediction_log).run_key != first.run_key
