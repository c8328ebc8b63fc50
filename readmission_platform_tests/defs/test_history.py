"""patient_history and the training set's history, across batches and as outcomes come back, through Dagster."""

import dagster as dg
import polars as pl
import pytest

from readmission_platform.defs.history.assets import patient_history
from readmission_platform.defs.history.sensors import history_sensor
from readmission_platform.defs.ingestion.assets import batch_tables
from readmission_platform.defs.outcomes.assets import outcomes
from readmission_platform.defs.resources import PredictionLogResource
from readmission_platform.defs.training.assets import training_set
from readmission_platform.lib.encounter import FIELDS
from readmission_platform.lib.features import record_features
from readmission_platform.lib.cleaning import clean_record
from readmission_platform.lib.history import ENCOUNTER, HISTORY_FEATURES, PATIENT, patient_key, patient_keys, patient_states
from readmission_platform.lib.history_store import KEY as STORED_KEY
from readmission_platform.lib.history_store import read_newer
from readmission_platform.serving.history import PatientHistory
from readmission_platform.serving.model import SMOKE_ENCOUNTERS
from readmission_platform.serving.prediction_log import write_predictions
from readmission_platform_tests.defs.conftest import ingest, metadata
from readmission_platform_tests.defs.test_outcomes import land

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
    version, states = read_newer(prediction_log.url, None)
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


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def any_log(request, tmp_path) -> PredictionLogResource:
    """The prediction log, which also holds the states the service reads: a SQLite file or a PostgreSQL schema."""
    url = f"sqlite:///{tmp_path / 'predictions.sqlite'}" if request.param == "sqlite" else request.getfixturevalue("pg_schema_url")
    return PredictionLogResource(url=url, patient_key=KEY)


@pytest.mark.parametrize("platform", ["duckdb"], indirect=True)
def test_an_outcome_of_a_named_patients_prediction_reaches_that_patients_next_request(platform, instance, resources, training_batches, any_log):
    ingest(platform, instance, resources, training_batches[0], "batch_0001")
    resources = resources | {"prediction_log": any_log}
    dg.materialize([patient_history], resources=resources, instance=instance)
    raw = platform.warehouse.read_table("raw_batches")
    # A patient with two loaded encounters, the later of them readmitted within 30 days: once another encounter follows
    # it, that readmission is an earlier one's and counts.
    counts = raw.group_by(PATIENT).agg(pl.len().alias("n"), pl.col("readmitted").sort_by(pl.col(ENCOUNTER).cast(pl.Int64)).last().alias("last"))
    patient = counts.filter((pl.col("n") == 2) & (pl.col("last") == "<30"))[PATIENT][0]
    before = served_state(any_log, patient)
    assert before["encounters"] == 2 and before["latest_readmitted_30d"] == 1

    # The service scored a new encounter for the patient (the log keeps its keyed hash) and one for nobody named.
    encounter = {name: SMOKE_ENCOUNTERS[0].get(name) for name in FIELDS} | {"time_in_hospital": 9, "num_medications": 33}
    write_predictions(any_log.url, (
        {"request_id": request_id, "endpoint": "predict", "model_name": "m", "model_version": "1", "probability": 0.2,
         "decision": False, "risk_band": "low", "patient_key": key, "inputs": encounter}
        for request_id, key in (("scored-1", patient_key(patient, KEY.encode())), ("anonymous-1", None))
    ))  # fmt: skip
    unchanged = dg.materialize([patient_history], resources=resources, instance=instance)
    assert metadata(unchanged, "patient_history")["confirmed_encounters"] == 0  # no outcome yet: nothing is known
    first_tick = history_sensor(dg.build_sensor_context(instance=instance, resources={"prediction_log": any_log}))

    outcome = b"request_id,readmitted_30d,known_at\nscored-1,1,2026-03-01T08:00:00Z\nanonymous-1,1,2026-03-01T08:00:00Z\n"
    land(platform, "outcomes_0001.csv", outcome, instance)
    assert dg.materialize([outcomes], partition_key="outcomes_0001", resources=resources, instance=instance).success
    tick = history_sensor(dg.build_sensor_context(instance=instance, resources={"prediction_log": any_log}))
    assert isinstance(tick, dg.RunRequest) and tick.run_key != first_tick.run_key  # the outcome starts a new run
    done = dg.materialize([patient_history], resources=resources, instance=instance)

    assert metadata(done, "patient_history")["confirmed_encounters"] == 1
    after = served_state(any_log, patient)
    # As if the scored encounter had been loaded after the patient's two: the same rule as in training.
    as_loaded = raw.filter(pl.col(PATIENT) == patient).vstack(
        raw.filter(pl.col(PATIENT) == patient).tail(1).with_columns(
            pl.lit("999999999").alias(ENCOUNTER), pl.lit("9").alias("time_in_hospital"), pl.lit("33").alias("num_medications"),
            *(pl.lit(str(encounter[n])).alias(n) for n in ("num_lab_procedures", "number_diagnoses", "number_inpatient")),
            pl.lit("<30").alias("readmitted"),
        )
    )  # fmt: skip
    assert after == patient_states(as_loaded).drop(PATIENT).row(0, named=True)
    assert (after["encounters"], after["readmissions_30d"], after["latest_readmitted_30d"]) == (3, before["readmissions_30d"] + 1, 1)
    assert (after["latest_time_in_hospital"], after["latest_num_medications"]) == (9, 33)
    # The next request for the patient is scored with it; every other patient's state is as it was.
    features = record_features(clean_record(encounter), after)
    assert (features["history_prior_encounters"], features["history_prior_readmissions_30d"]) == (3, before["readmissions_30d"] + 1)
    _, stored = read_newer(any_log.url, None)
    assert stored.height == raw[PATIENT].n_unique()
    assert stored.filter(pl.col(STORED_KEY) != patient_key(patient, KEY.encode())).sort(STORED_KEY).equals(
        history_before_outcome(raw, patient).sort(STORED_KEY)
    )


def served_state(log: PredictionLogResource, patient: str) -> dict[str, int]:
    """The patient's state as a service worker reads it from the store (`PatientHistory`)."""
    history = PatientHistory(log.url, KEY.encode())
    history.refresh()
    return dict(history.state(patient))


def history_before_outcome(raw: pl.DataFrame, patient: str) -> pl.DataFrame:
    """The stored states of every patient but `patient`, from the loaded encounters alone."""
    states = patient_states(raw.filter(pl.col(PATIENT) != patient))
    keyed = states.with_columns(pl.Series(STORED_KEY, patient_keys(states[PATIENT], KEY.encode())))
    return keyed.select(STORED_KEY, *(c for c in states.columns if c != PATIENT))
