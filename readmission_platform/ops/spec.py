"""The operating configuration in one place: every metric name the rules and dashboards use, the SLOs, the alerts,
the recording rules. `ops.generate` writes Prometheus', Alertmanager's and Grafana's files from it.

A metric is named here only through the module that exposes it (`serving.metrics`, `ops.pipeline`) or, for
BentoML's own, once below; so a renamed metric changes every rule and panel with it, and the tests evaluate
each of them against a real Prometheus scraping a real service.
"""

from __future__ import annotations

from dataclasses import dataclass

import prometheus_client

from readmission_platform.ops import pipeline
from readmission_platform.serving import metrics as service

SERVICE_JOB = "readmission-service"
PIPELINE_JOB = "readmission-pipeline"
RUNBOOKS = "docs/runbooks"


def family(metric: prometheus_client.metrics.MetricWrapperBase) -> str:
    """The name Prometheus stores a metric under (a counter's with `_total`)."""
    name = metric.describe()[0].name
    return f"{name}_total" if isinstance(metric, prometheus_client.Counter) else name


# BentoML's own HTTP metrics (labels endpoint, http_response_code, service_name, service_version); its histogram's
# buckets hold the SLO thresholds because the service declares them (`serving.metrics.DURATION_BUCKETS`).
REQUESTS = "bentoml_service_request_total"
DURATION = "bentoml_service_request_duration_seconds"
IN_PROGRESS = "bentoml_service_request_in_progress"

PREDICTIONS = family(service.PREDICTIONS)
PROBABILITY = family(service.PROBABILITY)
REJECTED = family(service.REJECTED)
RELOADS = family(service.RELOADS)
LOG_DROPPED = family(service.LOG_DROPPED)
UNLOGGED = family(service.UNLOGGED)
READY = family(service.READY)
VALIDATION_POSITIVE_RATE = family(service.VALIDATION_POSITIVE_RATE)
SCORING_SECONDS = family(service.SCORING_SECONDS)
CANDIDATE_FAILURES = family(service.CANDIDATE_FAILURES)

SERVICE_METRICS = (REQUESTS, DURATION, IN_PROGRESS, PREDICTIONS, PROBABILITY, REJECTED, RELOADS, LOG_DROPPED, UNLOGGED,
                   READY, VALIDATION_POSITIVE_RATE, SCORING_SECONDS, CANDIDATE_FAILURES)  # fmt: skip
PIPELINE_METRICS = pipeline.NAMES

# The prediction routes an SLO is about; latency only of the single-encounter ones, as a batch's time grows with it.
PREDICTION_ROUTES = '"/predict|/predict_batch|/explain"'
SINGLE_ROUTES = '"/predict|/explain"'


@dataclass(frozen=True)
class SLO:
    """An objective over prediction requests: `bad` requests out of `total`, PromQL rates over a window `{w}`."""

    name: str
    objective: float  # the share of good requests, e.g. 0.999
    bad: str
    total: str
    description: str

    @property
    def budget(self) -> float:
        return round(1 - self.objective, 10)

    @staticmethod
    def at(rate: str, window: str) -> str:
        return rate.replace("{w}", window)

    def record(self, window: str) -> str:
        return f"readmission:slo_{self.name}:ratio_rate{window}"


def _slow(seconds: float) -> str:
    return (
        f"sum(rate({DURATION}_count{{endpoint=~{SINGLE_ROUTES}}}[{{w}}]))"
        f" - sum(rate({DURATION}_bucket{{endpoint=~{SINGLE_ROUTES}, le=\"{seconds}\"}}[{{w}}]))"
    )


SLOS = (
    SLO(
        name="errors",
        objective=0.999,
        bad=f'sum(rate({REQUESTS}{{endpoint=~{PREDICTION_ROUTES}, http_response_code=~"5.."}}[{{w}}]))',
        total=f"sum(rate({REQUESTS}{{endpoint=~{PREDICTION_ROUTES}}}[{{w}}]))",
        description="99.9 % of prediction requests answered without a 5xx",
    ),
    SLO(
        name="latency_p95",
        objective=0.95,
        bad=_slow(0.4),
        total=f"sum(rate({DURATION}_count{{endpoint=~{SINGLE_ROUTES}}}[{{w}}]))",
        description="95 % of single-encounter requests answered within 400 ms (p95 < 400 ms)",
    ),
    SLO(
        name="latency_p99",
        objective=0.99,
        bad=_slow(0.5),
        total=f"sum(rate({DURATION}_count{{endpoint=~{SINGLE_ROUTES}}}[{{w}}]))",
        description="99 % of single-encounter requests answered within 500 ms (p99 < 500 ms)",
    ),
)

# The Google SRE workbook's multi-window, multi-burn-rate pairs (chapter 5, "Alerting on SLOs", table 5-8):
# (long window, short window, burn rate) and the severity of each pair.
BURN_WINDOWS = {
    "critical": (("1h", "5m", 14.4), ("6h", "30m", 6.0)),
    "warning": (("1d", "2h", 3.0), ("3d", "6h", 1.0)),
}
WINDOWS = ("5m", "30m", "1h", "2h", "6h", "1d", "3d")


@dataclass(frozen=True)
class Alert:
    name: str
    expr: str
    severity: str  # critical: pages; warning: a ticket
    summary: str
    description: str
    duration: str = "0m"

    @property
    def runbook(self) -> str:
        return f"{RUNBOOKS}/{self.name}.md"


def _burn_alerts(slo: SLO) -> list[Alert]:
    title = "".join(part.title() for part in slo.name.split("_"))
    alerts = []
    for severity, pairs in BURN_WINDOWS.items():
        expr = " or ".join(
            f"({slo.record(long)} > {rate} * {slo.budget} and {slo.record(short)} > {rate} * {slo.budget})"
            for long, short, rate in pairs
        )
        windows = ", ".join(f"{long}/{short} at {rate}×" for long, short, rate in pairs)
        alerts.append(
            Alert(
                name=f"Readmission{title}BudgetBurn",
                expr=expr,
                severity=severity,
                duration="2m" if severity == "critical" else "15m",
                summary=f"The {slo.name.replace('_', ' ')} SLO's error budget is burning too fast.",
                description=f"SLO: {slo.description}. Burn rate over {windows}; "
                + ("the month's budget goes in days." if severity == "critical" else "the budget goes before the month ends."),
            )
        )
    return alerts


POSITIVE_RATE_SHIFT = 0.10  # absolute: a flagged share this far from the validation's is a different population
POSITIVE_RATE_MIN_PREDICTIONS = 200  # fewer in the hour are too few to tell a shift from chance

ALERTS = (
    Alert(
        name="ReadmissionServiceDown",
        expr=f'up{{job="{SERVICE_JOB}"}} == 0',
        duration="2m",
        severity="critical",
        summary="Prometheus cannot scrape the readmission service.",
        description="{{ $labels.instance }} has not answered /metrics for 2 minutes.",
    ),
    Alert(
        name="ReadmissionNoReadyModel",
        expr=f"min by (instance) ({READY}) == 0",
        duration="5m",
        severity="critical",
        summary="A worker of the readmission service has no model to answer with.",
        description="{{ $labels.instance }} answers predictions with 503: no version behind `production` could load.",
    ),
    Alert(
        name="ReadmissionHighErrorRate",
        expr=(
            f'sum by (instance) (rate({REQUESTS}{{http_response_code=~"5.."}}[5m]))'
            f" / sum by (instance) (rate({REQUESTS}[5m])) > 0.05"
        ),
        duration="5m",
        severity="warning",
        summary="More than 5 % of the readmission service's requests fail with a 5xx.",
        description="{{ $labels.instance }} answered more than 5 % of its requests with a 5xx over 5 minutes.",
    ),
    Alert(
        name="ReadmissionLatencyHigh",
        expr='readmission:request_duration_seconds:p99_rate5m{endpoint=~' + SINGLE_ROUTES + "} > 0.5",
        duration="10m",
        severity="warning",
        summary="The readmission service's p99 latency is over 500 ms.",
        description="{{ $labels.endpoint }}: p99 over 500 ms for 10 minutes.",
    ),
    Alert(
        name="ReadmissionModelReloadFailed",
        expr=f'increase({RELOADS}{{outcome="failed"}}[15m]) > 0',
        severity="warning",
        summary="A version behind `production` failed to load in the readmission service.",
        description="{{ $labels.instance }}: a model load failed in the last 15 minutes; the worker keeps its old version.",
    ),
    Alert(
        name="ReadmissionPredictionLogDrops",
        expr=f"increase({LOG_DROPPED}[10m]) > 0",
        severity="warning",
        summary="The prediction log is dropping predictions.",
        description="{{ $labels.instance }} could not log some predictions in the last 10 minutes (queue full or database down).",
    ),
    Alert(
        name="ReadmissionPositiveRateShift",
        expr=(
            f"abs(readmission:positive_rate:ratio_rate1h - on (model_version) group_left"
            f" max by (model_version) ({VALIDATION_POSITIVE_RATE})) > {POSITIVE_RATE_SHIFT}"
            f" and on (model_version) sum by (model_version) (increase({PREDICTIONS}[1h]))"
            f" >= {POSITIVE_RATE_MIN_PREDICTIONS}"
        ),
        duration="15m",
        severity="warning",
        summary="The share of encounters flagged has moved away from the version's validation share.",
        description="Version {{ $labels.model_version }} flagged a share of encounters over the last hour more than"
        f" {POSITIVE_RATE_SHIFT:.0%} away from the share it flagged on its validation rows.",
    ),
    *(alert for slo in SLOS for alert in _burn_alerts(slo)),
    Alert(
        name="ReadmissionIngestionStale",
        # Batches wait and no ingestion is less than a day old: the exporter serves no last ingestion before the first
        # one, so a deployment that never ingested (its series absent) fires too, as one that stopped a day ago.
        expr=f"{pipeline.BATCHES_WAITING} > 0 unless on (job) (time() - {pipeline.LAST_INGESTION} <= 86400)",
        duration="30m",
        severity="warning",
        summary="Batches wait in the landing folder and none has been ingested for a day, or ever.",
        description="Batch files wait in the landing folder; no batch has been ingested for more than a day, or none ever was.",
    ),
)


@dataclass(frozen=True)
class PipelineAlert:
    """An alert the Dagster sensors (`defs/monitoring/sensors.py`) post to Alertmanager, not evaluated by Prometheus."""

    name: str
    severity: str
    summary: str

    @property
    def runbook(self) -> str:
        return f"{RUNBOOKS}/{self.name}.md"


PIPELINE_ALERTS = {
    "run": PipelineAlert("ReadmissionPipelineRunFailed", "warning", "A Dagster run of the readmission pipeline failed."),
    # critical: a check of severity ERROR blocks the assets after it; a WARN check's failure is a warning.
    "check": PipelineAlert("ReadmissionPipelineCheckFailed", "critical", "An asset check of the readmission pipeline failed."),
}


def recording_rules() -> list[dict[str, str]]:
    """The SLO ratios over every window the burn-rate alerts use, and the series the dashboards and alerts share."""
    rules = [
        {"record": slo.record(w), "expr": f"({slo.at(slo.bad, w)}) / ({slo.at(slo.total, w)})"}
        for slo in SLOS
        for w in WINDOWS
    ]
    for quantile in ("0.5", "0.95", "0.99"):
        rules.append(
            {
                "record": f"readmission:request_duration_seconds:p{quantile[2:].ljust(2, '0')}_rate5m",
                "expr": f"histogram_quantile({quantile}, sum by (endpoint, le) (rate({DURATION}_bucket[5m])))",
            }
        )
    rules.append(
        {
            "record": "readmission:positive_rate:ratio_rate1h",
            "expr": f'sum by (model_version) (rate({PREDICTIONS}{{decision="flagged"}}[1h]))'
            f" / sum by (model_version) (rate({PREDICTIONS}[1h]))",
        }
    )
    return rules
