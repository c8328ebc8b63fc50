"""The loop end to end: a real `bentoml serve` logs its predictions, their outcomes land, and live_performance
measures the served version on them, with the prediction log and the warehouse on SQLite/DuckDB and on PostgreSQL."""

from __future__ import annotations

from datetime import UTC, datetime

import dagster as dg
import httpx
import numpy as np
import polars as pl
import pytest
from sklearn.metrics import roc_auc_score

from readmission_platform.defs.outcomes.assets import outcomes
from readmission_platform.defs.outcomes.live import DISCRIMINATION, LIVE, live_performance
from readmission_platform.defs.outcomes.sensors import outcome_sensor
from readmission_platform.defs.resources import (
    LandingResource,
    MlflowResource,
    PredictionLogResource,
    WarehouseResource,
)
from readmission_platform.lib.outcomes import land_outcomes, outcomes_csv
from readmission_platform.lib.predictions import read_predictions
from readmission_platform.lib.warehouse import open_warehouse
from readmission_platform.serving.server import running_server
from readmission_platform_tests.serving.conftest import register, registry_of, settings_in


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def stores(request, tmp_path) -> dict[str, str]:
    """Where the prediction log and the warehouse live: files, or one PostgreSQL schema."""
    if request.param == "sqlite":
        return {"READMISSION_PREDICTION_LOG_URL": f"sqlite:///{tmp_path / 'predictions.sqlite'}",
                "READMISSION_WAREHOUSE_URL": f"duckdb:///{tmp_path / 'warehouse.duckdb'}"}  # fmt: skip
    url = request.getfixturevalue("pg_schema_url")
    return {"READMISSION_PREDICTION_LOG_URL": url, "READMISSION_WAREHOUSE_URL": url}


def test_served_predictions_and_their_outcomes_give_each_version_s_live_figures(
    tmp_path, stores, sample_candidates, sample_parts, test_encounters
):
    settings = settings_in(tmp_path / "home", **stores)
    version = register(registry_of(settings), sample_candidates["hist_gradient_boosting"], sample_parts, promote=True)
    requests, rows = test_encounters
    sent = [encounter | {"request_id": str(encounter_id)} for encounter, encounter_id in zip(requests, rows["encounter_id"])]
    with running_server(settings, bento=None, env={"READMISSION_PREDICTION_LOG_URL": settings.prediction_log_url}) as url:
        answer = httpx.post(f"{url}/predict_batch", json={"encounters": sent}, timeout=300)
    assert answer.status_code == 200, answer.text

    labels = rows.select("encounter_id", "readmitted_30d")
    path = land_outcomes(outcomes_csv(labels, datetime.now(UTC)), settings.landing_dir / "outcomes")
    resources = {
        "landing": LandingResource(folder=str(settings.landing_dir)),
        "warehouse": WarehouseResource(url=settings.warehouse_url),
        "prediction_log": PredictionLogResource(url=settings.prediction_log_url),
        "mlflow": MlflowResource(tracking_uri=settings.mlflow_tracking_uri, artifact_root=settings.mlflow_artifact_root.as_uri()),
    }
    with dg.instance_for_test() as instance:
        tick = outcome_sensor(dg.build_sensor_context(instance=instance, resources={"landing": resources["landing"]}))
        for request in tick.dynamic_partitions_requests:
            instance.add_dynamic_partitions(request.partitions_def_name, list(request.partition_keys))
        assert [r.partition_key for r in tick.run_requests] == [path.stem]
        assert dg.materialize([outcomes], partition_key=path.stem, resources=resources, instance=instance).success
        measured = dg.materialize([live_performance], resources=resources, instance=instance)

    logged = read_predictions(settings.prediction_log_url, ["request_id", "model_version", "probability"])
    assert logged.height == len(sent) and logged["model_version"].unique().to_list() == [version]
    joined = logged.with_columns(pl.col("request_id").cast(pl.Int64).alias("encounter_id")).join(labels, on="encounter_id")
    figures = open_warehouse(settings.warehouse_url).query(f"SELECT metric, estimate, outcomes FROM {LIVE} WHERE model_version = $1", [version])
    by = dict(zip(figures["metric"], figures["estimate"]))
    assert by["roc_auc"] == pytest.approx(roc_auc_score(joined["readmitted_30d"].to_numpy(), joined["probability"].to_numpy()), rel=1e-9)
    assert by["observed_rate"] == pytest.approx(float(np.mean(labels["readmitted_30d"].to_numpy())))
    assert figures["outcomes"][0] == len(sent)
    (discrimination,) = [e for e in measured.get_asset_check_evaluations() if e.check_name == DISCRIMINATION]
    assert f"v{version}'s live ROC-AUC" in discrimination.description and "1,000 outcomes" in discrimination.description
    run = registry_of(settings).client.get_run(registry_of(settings).version(version).run_id)
    assert run.data.metrics["live_roc_auc"] == pytest.approx(by["roc_auc"])  # beside the offline figures in MLflow
