"""The service's Prometheus metrics, each named once here; the service, its gate and its model watcher count in them.

BentoML sets up prometheus_client's multiprocess mode in each worker before the service is imported, so these are
the same metrics `/metrics` gathers from every worker (`bentoml.metrics` is now only an alias of prometheus_client).
"""

from __future__ import annotations

from typing import Any

import prometheus_client

# BentoML's request-duration buckets (its default lacks 0.4): the SLO thresholds, 400 ms (p95) and 500 ms (p99),
# must be bounds for the burn-rate rules to count the requests over them exactly.
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)

PREDICTIONS = prometheus_client.Counter(
    name="readmission_predictions",
    documentation="Predictions answered, by model version, stage (production or canary) and decision.",
    labelnames=["model_version", "stage", "decision"],
)  # fmt: skip
# The time a version took to score a request's encounters (a shadow's too), by route: a batch's grows with its rows.
SCORING_SECONDS = prometheus_client.Histogram(
    name="readmission_scoring_seconds",
    documentation="Seconds a version took to score a request's encounters, by version, stage and route.",
    labelnames=["model_version", "stage", "endpoint"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.2, 0.4, 1.0, 2.5, 10.0),
)  # fmt: skip
CANDIDATE_FAILURES = prometheus_client.Counter(
    name="readmission_candidate_failures",
    documentation="Requests a candidate (shadow or canary) failed, production answering: by version, stage and cause "
    "(load: it did not load; raised; slow: over its time budget).",
    labelnames=["model_version", "stage", "cause"],
)  # fmt: skip
PROBABILITY = prometheus_client.Histogram(
    name="readmission_prediction_probability", documentation="Predicted probabilities of readmission within 30 days.",
    buckets=(0.02, 0.05, 0.08, 0.11, 0.14, 0.17, 0.2, 0.3, 0.4, 0.6, 1.0),
)  # fmt: skip
REJECTED = prometheus_client.Counter(
    name="readmission_rejected_requests", documentation="Requests answered with a 4xx status, by route and status.",
    labelnames=["route", "status"],
)  # fmt: skip
RELOADS = prometheus_client.Counter(
    name="readmission_model_reloads", documentation="Model loads by outcome: loaded (now serving) or failed.",
    labelnames=["outcome"],
)  # fmt: skip
LOG_DROPPED = prometheus_client.Counter(
    name="readmission_prediction_log_dropped", documentation="Predictions the log could not keep (queue full, writes failing).",
)  # fmt: skip
# Gauges of a worker; "min" across workers, so one worker without a model shows as not ready.
READY = prometheus_client.Gauge(
    name="readmission_model_ready", documentation="1 when every worker has a model to answer with, 0 otherwise.",
    multiprocess_mode="min",
)  # fmt: skip
# The share of its validation rows a version flagged: what its live positive rate is compared with.
VALIDATION_POSITIVE_RATE = prometheus_client.Gauge(
    name="readmission_model_validation_positive_rate", documentation="Share of validation rows the version flagged.",
    labelnames=["model_version"], multiprocess_mode="max",
)  # fmt: skip
UNLOGGED = prometheus_client.Counter(
    name="readmission_refusals_unlogged", documentation="Refused requests not written to the log, past its rate limit.",
)  # fmt: skip


class Children:
    """A labelled metric's children by their label values (in `labelnames` order), found in a dict after the first
    time: `labels()` checks its arguments and takes a lock on every call, on /predict's path twice a request."""

    def __init__(self, metric: Any) -> None:
        self.metric, self.found = metric, {}

    def __call__(self, *values: str) -> Any:
        child = self.found.get(values)
        if child is None:  # two threads may both make it: labels() gives both the same child
            child = self.found[values] = self.metric.labels(*values)
        return child


PREDICTED = Children(PREDICTIONS)  # (model_version, stage, decision)
SCORED = Children(SCORING_SECONDS)  # (model_version, stage, endpoint)
