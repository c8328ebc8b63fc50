"""The pipeline's metrics as Prometheus reads them, from a real Dagster instance and landing folder."""

from __future__ import annotations

import dagster as dg
import prometheus_client

from readmission_platform.ops import pipeline
from readmission_platform.ops.pipeline import PipelineCollector


@dg.asset
def raw_batches() -> None:
    raise ValueError("batch_0002.csv holds bytes that are not UTF-8")


@dg.asset
def checked() -> int:
    return 1


@dg.asset_check(asset=checked)
def check_checked_rows() -> dg.AssetCheckResult:
    return dg.AssetCheckResult(passed=False, severity=dg.AssetCheckSeverity.WARN)


@dg.asset_check(asset=checked)
def check_checked_columns() -> dg.AssetCheckResult:
    return dg.AssetCheckResult(passed=True)


def test_ingestion_batches_waiting_failed_runs_and_check_results(tmp_path):
    for name in ("batch_0001.csv", "batch_0002.csv", "batch_0003.csv", ".batch_0004.csv.tmp"):
        (tmp_path / name).write_text("encounter_id\n1\n")
    with dg.instance_for_test() as instance:
        instance.report_runless_asset_event(dg.AssetMaterialization("raw_batches", partition="batch_0001"))
        assert not dg.materialize([raw_batches], instance=instance, raise_on_error=False).success
        dg.materialize([checked, check_checked_rows, check_checked_columns], instance=instance)
        ingested = instance.fetch_materializations(dg.AssetKey("raw_batches"), limit=1).records[0].timestamp
        registry = prometheus_client.CollectorRegistry()
        checks = [check_checked_rows.check_key, check_checked_columns.check_key]
        registry.register(PipelineCollector(instance, tmp_path, checks))
        value = registry.get_sample_value

        assert value(pipeline.LAST_INGESTION) == ingested
        assert value(pipeline.BATCHES_WAITING) == 2  # 0002 failed, 0003 never ran; the file being written is not one
        assert value(pipeline.FAILED_RUNS, {"job_name": "__ephemeral_asset_job__"}) == 1
        assert value(pipeline.CHECK_RESULTS, {"outcome": "failed", "severity": "warn"}) == 1
        assert value(pipeline.CHECK_RESULTS, {"outcome": "passed", "severity": "error"}) == 1
        assert value(pipeline.CHECK_RESULTS, {"outcome": "failed", "severity": "error"}) == 0
