"""Grafana dashboards as data: each panel's queries built from `ops.spec`'s metric names, rendered to Grafana's JSON."""

from __future__ import annotations

from dataclasses import dataclass

from readmission_platform.ops import pipeline, spec

DATASOURCE = "prometheus"
ROUTE = f"endpoint=~{spec.PREDICTION_ROUTES}"


@dataclass(frozen=True)
class Panel:
    title: str
    queries: tuple[tuple[str, str], ...]  # (PromQL, legend)
    unit: str = "short"
    kind: str = "timeseries"


SERVICE = (
    Panel("Requests per second by route and status",
          ((f"sum by (endpoint, http_response_code) (rate({spec.REQUESTS}{{{ROUTE}}}[5m]))",
            "{{endpoint}} {{http_response_code}}"),), "reqps"),
    Panel("5xx share of prediction requests", ((spec.SLOS[0].record("5m"), "5xx share"),), "percentunit"),
    Panel("Latency quantiles by route",
          tuple((f"readmission:request_duration_seconds:p{q}_rate5m{{{ROUTE}}}", f"p{q} {{{{endpoint}}}}")
                for q in ("50", "95", "99")), "s"),  # fmt: skip
    Panel("Requests in progress", ((f"sum by (endpoint) ({spec.IN_PROGRESS})", "{{endpoint}}"),)),
    Panel("Refused requests by route and status",
          ((f"sum by (route, status) (rate({spec.REJECTED}[5m]))", "{{route}} {{status}}"),), "reqps"),
    Panel("Error budget left over 3 days (share of the budget)",
          tuple((f"1 - {slo.record('3d')} / {slo.budget}", slo.name) for slo in spec.SLOS), "percentunit"),
    Panel("Requests per second by model version",
          ((f"sum by (model_version) (rate({spec.PREDICTIONS}[5m]))", "version {{model_version}}"),), "reqps"),
)

MODEL = (
    Panel("Predictions per second by version and decision",
          ((f"sum by (model_version, decision) (rate({spec.PREDICTIONS}[5m]))", "{{model_version}} {{decision}}"),),
          "ops"),  # fmt: skip
    Panel("Share flagged, live against validation, by version",
          (("readmission:positive_rate:ratio_rate1h", "live {{model_version}}"),
           (f"max by (model_version) ({spec.VALIDATION_POSITIVE_RATE})", "validation {{model_version}}")),
          "percentunit"),  # fmt: skip
    Panel("Predicted probability distribution",
          ((f"sum by (le) (increase({spec.PROBABILITY}_bucket[1h]))", "≤ {{le}}"),), kind="bargauge"),
    Panel("Median predicted probability",
          ((f"histogram_quantile(0.5, sum by (le) (rate({spec.PROBABILITY}_bucket[1h])))", "median"),)),
    Panel("Model ready (every worker)", ((f"min({spec.READY})", "ready"),), kind="stat"),
    Panel("Model loads by outcome", ((f"sum by (outcome) (increase({spec.RELOADS}[1h]))", "{{outcome}}"),)),
    Panel("Rollout: predictions per second by version and stage",
          ((f"sum by (model_version, stage) (rate({spec.PREDICTIONS}[5m]))", "{{model_version}} {{stage}}"),), "ops"),
    Panel("Rollout: p99 scoring time of single encounters by version and stage",
          ((f'histogram_quantile(0.99, sum by (le, model_version, stage) (rate({spec.SCORING_SECONDS}_bucket{{endpoint="predict"}}[5m])))',
            "{{model_version}} {{stage}}"),), "s"),  # fmt: skip
    Panel("Rollout: candidate failures by version, stage and cause (production answered)",
          ((f"sum by (model_version, stage, cause) (increase({spec.CANDIDATE_FAILURES}[5m]))",
            "{{model_version}} {{stage}} {{cause}}"),)),  # fmt: skip
)

PREDICTION_LOG = (
    Panel("Predictions logged per second", ((f"sum(rate({spec.PREDICTIONS}[5m]))", "predictions"),), "ops"),
    Panel("Predictions dropped by the log", ((f"sum(increase({spec.LOG_DROPPED}[5m]))", "dropped"),)),
    Panel("Dropped share", ((f"sum(rate({spec.LOG_DROPPED}[5m])) / sum(rate({spec.PREDICTIONS}[5m]))", "dropped"),),
          "percentunit"),  # fmt: skip
    Panel("Refusals not written to the server log", ((f"sum(increase({spec.UNLOGGED}[5m]))", "unlogged"),)),
)

PIPELINE = (
    Panel("Since the last successful ingestion", ((f"time() - {pipeline.LAST_INGESTION}", "since"),), "s", "stat"),
    Panel("Batches waiting in the landing folder", ((pipeline.BATCHES_WAITING, "waiting"),), kind="stat"),
    Panel("Failed runs by job (increase over 1 h)",
          ((f"sum by (job_name) (increase({pipeline.FAILED_RUNS}[1h]))", "{{job_name}}"),)),
    Panel("Asset checks by latest outcome and severity",
          ((f"sum by (outcome, severity) ({pipeline.CHECK_RESULTS})", "{{outcome}} {{severity}}"),), kind="bargauge"),
)

PANELS = {
    "service-overview": ("Readmission service", SERVICE),
    "model": ("Readmission model", MODEL),
    "prediction-log": ("Readmission prediction log", PREDICTION_LOG),
    "pipeline": ("Readmission pipeline", PIPELINE),
}


def render(uid: str, title: str, panels: tuple[Panel, ...]) -> dict:
    """Grafana's dashboard JSON (schema 39): the panels two to a row."""
    return {
        "uid": f"readmission-{uid}",
        "title": title,
        "tags": ["readmission"],
        "timezone": "utc",
        "schemaVersion": 39,
        "refresh": "30s",
        "time": {"from": "now-6h", "to": "now"},
        "panels": [
            {
                "id": index + 1,
                "type": panel.kind,
                "title": panel.title,
                "datasource": {"type": "prometheus", "uid": DATASOURCE},
                "gridPos": {"h": 8, "w": 12, "x": 12 * (index % 2), "y": 8 * (index // 2)},
                "fieldConfig": {"defaults": {"unit": panel.unit}, "overrides": []},
                "targets": [
                    {"refId": chr(ord("A") + n), "expr": expr, "legendFormat": legend,
                     "datasource": {"type": "prometheus", "uid": DATASOURCE}}
                    for n, (expr, legend) in enumerate(panel.queries)
                ],  # fmt: skip
            }
            for index, panel in enumerate(panels)
        ],
    }


DASHBOARDS = {uid: render(uid, title, panels) for uid, (title, panels) in PANELS.items()}
