"""The pipeline's metrics as Prometheus reads them, from a real Dagster instance and landing folder."""

from __future__ import annotations

import os
import subprocess
import sys

import dagster as dg
import httpx
import prometheus_client
from prometheus_client.parser import text_string_to_metric_families

from readmission_platform.ops import pipeline, rule_tests
from readmission_platform.ops.pipeline import PipelineCollector
from readmission_platform.serving.server import free_port, stop, wait_until_answering


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


@dg.asset(name="checked")
def checked_failing() -> int:
    raise ValueError("the warehouse is down")


def test_a_check_whose_newest_run_failed_before_evaluating_it_keeps_its_last_result(tmp_path):
    with dg.instance_for_test() as instance:
        dg.materialize([checked, check_checked_rows, check_checked_columns], instance=instance)
        checks = [check_checked_rows.check_key, check_checked_columns.check_key]
        failed = dg.materialize([checked_failing, check_checked_rows, check_checked_columns], instance=instance, raise_on_error=False)
        assert not failed.success
        latest = instance.event_log_storage.get_latest_asset_check_execution_by_key(checks)
        assert all(record.event.asset_check_evaluation is None for record in latest.values())  # plans only
        registry = prometheus_client.CollectorRegistry()
        registry.register(PipelineCollector(instance, tmp_path, checks))

        assert registry.get_sample_value(pipeline.CHECK_RESULTS, {"outcome": "failed", "severity": "warn"}) == 1
        assert registry.get_sample_value(pipeline.CHECK_RESULTS, {"outcome": "passed", "severity": "error"}) == 1


def test_before_any_ingestion_there_is_no_last_ingestion_and_the_stale_alert_is_tested_so(tmp_path):
    """Nothing ingested yet: the last ingestion's time is no sample at all (not 0), batches wait. ReadmissionIngestionStale
    has a promtool case of this very input, the series absent, and it fires."""
    for name in ("batch_0001.csv", "batch_0002.csv"):
        (tmp_path / name).write_text("encounter_id\n1\n")
    with dg.instance_for_test() as instance:
        registry = prometheus_client.CollectorRegistry()
        registry.register(PipelineCollector(instance, tmp_path, []))
        assert registry.get_sample_value(pipeline.LAST_INGESTION) is None
        assert registry.get_sample_value(pipeline.BATCHES_WAITING) == 2
    never = [case for case in rule_tests.CASES if case.alert == "ReadmissionIngestionStale"
             and not any(series.startswith(pipeline.LAST_INGESTION) for series in case.series)]  # fmt: skip
    assert any(case.fires for case in never) and any(not case.fires for case in never)


def test_the_exporter_process_serves_the_instance_of_its_dagster_home(tmp_path):
    """`python -m readmission_platform.ops.pipeline`, as the production profile runs it: the instance of DAGSTER_HOME,
    the batches of READMISSION_LANDING_DIR, every check of the definitions; SIGTERM stops it cleanly."""
    dagster_home, landing = tmp_path / "dagster", tmp_path / "landing"
    dagster_home.mkdir()
    landing.mkdir()
    (dagster_home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    for name in ("batch_0001.csv", "batch_0002.csv"):
        (landing / name).write_text("encounter_id\n1\n")
    with dg.DagsterInstance.from_config(str(dagster_home)) as instance:
        instance.report_runless_asset_event(dg.AssetMaterialization("raw_batches", partition="batch_0001"))
        ingested = instance.fetch_materializations(dg.AssetKey("raw_batches"), limit=1).records[0].timestamp
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("READMISSION_", "DAGSTER_"))} | {
        "DAGSTER_HOME": str(dagster_home), "READMISSION_HOME": str(tmp_path / "home"), "READMISSION_LANDING_DIR": str(landing),
    }  # fmt: skip
    log = tmp_path / "exporter.log"
    with open(log, "wb") as output:
        process = subprocess.Popen([sys.executable, "-m", "readmission_platform.ops.pipeline", "--port", str(port)],
                                   env=env, stdout=output, stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
    try:
        url = f"http://127.0.0.1:{port}/metrics"
        wait_until_answering(process, url, "the exporter", 120, log)
        samples = {
            (sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(httpx.get(url, timeout=10).text)
            for sample in family.samples
        }  # fmt: skip
        assert samples[pipeline.LAST_INGESTION, ()] == ingested
        assert samples[pipeline.BATCHES_WAITING, ()] == 1
        # No check has run on this instance: each outcome and severity is there, at zero.
        results = {labels: value for (name, labels), value in samples.items() if name == pipeline.CHECK_RESULTS}
        assert results == {(("outcome", o), ("severity", s)): 0 for o in ("passed", "failed") for s in ("error", "warn")}
    finally:
        stop(process)
    assert process.returncode == 0, log.read_text()
