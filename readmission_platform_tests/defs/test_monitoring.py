"""serving_drift over a real prediction log written by the service's writer, against a real production model."""

from __future__ import annotations

from datetime import UTC, datetime

import dagster as dg
import polars as pl
import pytest

from readmission_platform.cli.report import render_serving_drift
from readmission_platform.defs.monitoring.assets import serving_drift
from readmission_platform.defs.monitoring.sensors import serving_drift_schedule
from readmission_platform.defs.resources import PredictionLogResource
from readmission_platform.lib.cleaning import clean
from readmission_platform.lib.encounter import REQUEST_DTYPES
from readmission_platform.lib.features import build_features
from readmission_platform.lib.history import HISTORY_FEATURES
from readmission_platform.lib.ingest import parse_batch
from readmission_platform.lib.predictions import read_predictions
from readmission_platform.lib.training import predict_probability
from readmission_platform.serving.prediction_log import write_predictions
from readmission_platform_tests.conftest import INGESTED_AT, NOTHING_LOADED
from readmission_platform_tests.defs.conftest import TWO_FAMILIES, ingest, metadata, retrain


def served(data: bytes, model, version: str) -> pl.DataFrame:
    """A batch file's encounters as the service logs them after `model` scored them as `version`."""
    rows = clean(parse_batch(data, batch_id="served", source_file="f.csv", loaded_elsewhere=NOTHING_LOADED, now=INGESTED_AT).rows).frame
    # Served without a patient identifier: the history features are a first encounter's, as the service makes them.
    probability = predict_probability(model, build_features(rows).with_columns(pl.lit(0.0).alias(name) for name in HISTORY_FEATURES))
    return rows.select(pl.col(name).cast(dtype) for name, dtype in REQUEST_DTYPES.items()).with_columns(
        pl.format("r-{}-{}", pl.lit(version), pl.int_range(pl.len())).alias("request_id"),
        pl.lit("/predict_batch").alias("endpoint"),
        pl.lit("readmission-classifier").alias("model_name"),
        pl.lit(version).alias("model_version"),
        pl.Series("probability", probability),
        pl.Series("decision", probability >= 0.5),
        pl.lit("low").alias("risk_band"),
    )


def log(url: str, *frames: pl.DataFrame) -> str:
    """Write the frames as the service's log writer does; the UTC day they were logged in."""
    write_predictions(url, frame=pl.concat(frames))
    return read_predictions(url, ["predicted_at"])["predicted_at"][0].strftime("%Y-%m-%d")


@pytest.mark.parametrize("platform", ["duckdb"], indirect=True)
def test_serving_drift_names_a_planted_shift_and_passes_an_undisturbed_day(platform, instance, resources, mlflow, steady_batches, tmp_path):
    for i, data in enumerate(steady_batches[:2], start=1):
        ingest(platform, instance, resources, data, f"batch_{i:04d}")
    retrain(instance, resources, run_config=TWO_FAMILIES)  # the linear model alone fails the gates on these batches
    model = mlflow.registry().load_model("1")
    steady = served(steady_batches[2], model, "1")
    shifted = served(steady_batches[3], model, "2").with_columns(pl.col("num_lab_procedures") + 25)
    quiet_url, shifted_url = (f"sqlite:///{tmp_path / name}" for name in ("quiet.sqlite", "shifted.sqlite"))

    def run(url: str, day: str, min_predictions: int = 1_000) -> dg.ExecuteInProcessResult:
        return dg.materialize(
            [serving_drift],
            partition_key=day,
            instance=instance,
            resources=resources | {"prediction_log": PredictionLogResource(url=url)},
            run_config={"ops": {"serving_drift": {"config": {"min_predictions": min_predictions}}}},
        )

    quiet = run(quiet_url, log(quiet_url, steady))
    drifted_day = log(shifted_url, steady, shifted)
    drifted = run(shifted_url, drifted_day)
    too_few = run(shifted_url, drifted_day, min_predictions=max(steady.height, shifted.height) + 1)

    quiet_check, drifted_check = (r.get_asset_check_evaluations()[0] for r in (quiet, drifted))
    assert quiet_check.passed and "under 0.25" in quiet_check.description
    assert metadata(quiet, "serving_drift")["reference_batch"] == "batch_0002"
    assert not drifted_check.passed and drifted_check.severity == dg.AssetCheckSeverity.WARN
    assert "v2 num_lab_procedures" in drifted_check.description and "v1 " not in drifted_check.description
    movers = metadata(drifted, "serving_drift")["top_movers"]
    assert movers.startswith("v2 num_lab_procedures") and "v1 " in movers  # each version's top three
    unjudged = too_few.get_asset_check_evaluations()[0]
    assert unjudged.passed and "drift not judged" in unjudged.description
    status = render_serving_drift(instance)  # what `readmission status` prints: the day's newest measurement
    assert f"{drifted_day}" in status and "top: v2 num_lab_procedures" in status


def test_the_schedule_measures_the_day_that_just_ended():
    context = dg.build_schedule_context(scheduled_execution_time=datetime(2026, 3, 1, 0, 15, tzinfo=UTC))

    request = serving_drift_schedule(context)

    assert request.partition_key == "2026-02-28"


@pytest.mark.parametrize("platform", ["duckdb"], indirect=True)
def test_the_reference_is_the_batch_of_the_latest_encounters_whatever_the_batches_are_named(platform, full_features):
    from readmission_platform.defs.monitoring.assets import training_reference
    from readmission_platform.lib.features import FEATURE_SCHEMA

    ordered = full_features.sort("encounter_id").select(list(FEATURE_SCHEMA))
    for name, rows in (("zz_earlier", ordered.head(2_000)), ("aa_later", ordered.tail(2_000))):
        platform.warehouse.replace_batch({"features": (FEATURE_SCHEMA, rows.with_columns(batch_id=pl.lit(name)))}, name)

    rows, newest = training_reference(platform.warehouse, ["zz_earlier", "aa_later"])

    assert newest == "aa_later" and set(rows["batch_id"]) == {"aa_later"}
