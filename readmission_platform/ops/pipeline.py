"""The pipeline's health as Prometheus metrics, read from the Dagster instance at each scrape.

`readmission observe` serves them at /metrics beside Prometheus (job `readmission-pipeline`): a custom collector over
the instance, as Dagster's own run and event storage already hold the answers. The production profile runs the same
exporter as a process of its own: `python -m readmission_platform.ops.pipeline --host H --port P`, on the instance of
DAGSTER_HOME and the landing folder of READMISSION_LANDING_DIR.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import dagster as dg
from prometheus_client import start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector, CollectorRegistry

from readmission_platform.defs.partitions import latest_by_partition, latest_evaluation
from readmission_platform.lib.landing import batch_id_for, landed_files
from readmission_platform.settings import PIPELINE_METRICS_PORT, Settings

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
        for key, record in self.instance.event_log_storage.get_latest_asset_check_execution_by_key(self.checks).items():
            if record.event is None or record.event.asset_check_evaluation is None:
                # Planned: running now, or its run failed before evaluating it; the evaluation before stands.
                record = latest_evaluation(self.instance, key)
            evaluation = record.event.asset_check_evaluation if record is not None else None
            if evaluation is not None:
                outcomes["passed" if evaluation.passed else "failed", evaluation.severity.value.lower()] += 1
        for outcome in ("passed", "failed"):
            for severity in ("error", "warn"):
                results.add_metric([outcome, severity], outcomes[outcome, severity])
        yield results


def registry_for(instance: dg.DagsterInstance, landing_dir: Path) -> CollectorRegistry:
    """A registry holding the pipeline's collector over `instance`, judging every asset check the definitions declare."""
    from readmission_platform.definitions import defs

    registry = CollectorRegistry()
    registry.register(PipelineCollector(instance, landing_dir, list(defs.get_repository_def().asset_checks_defs_by_key)))
    return registry


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Serve the pipeline's metrics at /metrics until SIGTERM or Ctrl-C.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=PIPELINE_METRICS_PORT)
    args = parser.parse_args(argv)
    settings = Settings.from_env()
    # The instance is DAGSTER_HOME's as given (the profile's dagster.yaml), never one made under READMISSION_HOME.
    with dg.DagsterInstance.get() as instance:
        server, thread = start_http_server(args.port, addr=args.host, registry=registry_for(instance, settings.landing_dir))
        stopping = threading.Event()
        for each in (signal.SIGINT, signal.SIGTERM):
            signal.signal(each, lambda *_: stopping.set())
        print(f"the pipeline's metrics on http://{args.host}:{args.port}/metrics, landing folder {settings.landing_dir}", flush=True)
        stopping.wait()
        server.shutdown()
        thread.join()
    return 0


if __name__ == "__main__":
    sys.exit(main())
