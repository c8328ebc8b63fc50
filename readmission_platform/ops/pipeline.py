"""The pipeline's health as Prometheus metrics, read from the Dagster instance at each scrape.

`readmission observe` serves them at /metrics beside Prometheus (job `readmission-pipeline`): a custom collector over
the instance, as Dagster's own run and event storage already hold the answers.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import dagster as dg
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from readmission_platform.defs.partitions import latest_by_partition
from readmission_platform.lib.landing import batch_id_for, landed_files

# Names as Prometheus stores them; `ops.spec` imports them for the rules and dashboards.
LAST_INGESTION = "readmission_pipeline_last_ingestion_timestamp_seconds"
BATCHES_WAITING = "readmission_pipeline_batches_waiting"
FAILED_RUNS = "readmission_pipeline_failed_runs_total"
CHECK_RESULTS = "readmission_pipeline_check_results"
NAMES = (LAST_INGESTION, BATCHES_WAITING, FAILED_RUNS, CHECK_RESULTS)


class PipelineCollector(Collector):
    """Last successful ingestion, batches landed but not ingested, failed runs by job, latest check results."""

    def __init__(self, instance: dg.DagsterInstance, landing_dir: Path, checks: list[dg.AssetCheckKey]) -> None:
        self.instance, self.landing_dir, self.checks = instance, landing_dir, checks

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        ingested = latest_by_partition(self.instance, "raw_batches")
        last = GaugeMetricFamily(LAST_INGESTION, "Unix time of the newest successful ingestion of a batch.")
        if ingested:
            last.add_metric([], max(record.timestamp for record in ingested.values()))
        yield last
        waiting = [path for path in landed_files(self.landing_dir) if batch_id_for(path) not in ingested]
        yield GaugeMetricFamily(BATCHES_WAITING, "Batch files landed and not yet ingested.", value=len(waiting))

        failed = CounterMetricFamily(FAILED_RUNS.removesuffix("_total"), "Dagster runs that failed, by job.", labels=["job_name"])
        runs = self.instance.get_run_records(dg.RunsFilter(statuses=[dg.DagsterRunStatus.FAILURE]))
        for job, count in sorted(Counter(record.dagster_run.job_name for record in runs).items()):
            failed.add_metric([job], count)
        yield failed

        results = GaugeMetricFamily(
            CHECK_RESULTS, "Asset checks by the outcome of their latest evaluation and their severity.",
            labels=["outcome", "severity"],
        )  # fmt: skip
        outcomes: Counter[tuple[str, str]] = Counter()
        for record in self.instance.event_log_storage.get_latest_asset_check_execution_by_key(self.checks).values():
            evaluation = record.event.asset_check_evaluation if record.event else None
            if evaluation is not None:
                outcomes["passed" if evaluation.passed else "failed", evaluation.severity.value.lower()] += 1
        for outcome in ("passed", "failed"):
            for severity in ("error", "warn"):
                results.add_metric([outcome, severity], outcomes[outcome, severity])
        yield results
