"""`promtool test rules` cases for every alert of `ops.spec`: when it fires, and when it stays silent.

Series are written in promtool's expanding notation (`0+10x60`: 0, 10, 20, … for 60 steps). The expected
annotations are the alert's own, its `$labels` filled in, so a test fails when a rule's labels change.
"""

from __future__ import annotations

from dataclasses import dataclass

from readmission_platform.ops import pipeline, spec
from readmission_platform.settings import SERVICE_PORT

SVC = {"job": spec.SERVICE_JOB, "instance": f"service:{SERVICE_PORT}"}


@dataclass(frozen=True)
class Case:
    name: str
    alert: str
    series: dict[str, str]  # series selector → values
    at: str  # evaluation time
    fires: tuple[dict[str, str], ...]  # the labels of each firing alert (severity included); () for silent
    # Of the series and of the rules' evaluation: a day's worth of cases is evaluated every 5 minutes, as every
    # minute makes promtool several times slower.
    interval: str = "1m"


def _series(metric: str, **labels: str) -> str:
    return metric + "{" + ", ".join(f'{k}="{v}"' for k, v in sorted(labels.items())) + "}"


def _requests(ok: str, failed: str, route: str = "/predict") -> dict[str, str]:
    return {
        _series(spec.REQUESTS, **SVC, endpoint=route, http_response_code="200"): ok,
        _series(spec.REQUESTS, **SVC, endpoint=route, http_response_code="500"): failed,
    }


def _durations(fast_400: str, fast_500: str, total: str, route: str = "/predict") -> dict[str, str]:
    bucket = f"{spec.DURATION}_bucket"
    return {
        _series(bucket, **SVC, endpoint=route, le="0.4"): fast_400,
        _series(bucket, **SVC, endpoint=route, le="0.5"): fast_500,
        _series(bucket, **SVC, endpoint=route, le="0.75"): total,
        _series(bucket, **SVC, endpoint=route, le="+Inf"): total,
        _series(f"{spec.DURATION}_count", **SVC, endpoint=route): total,
    }


def _predictions(flagged: str, not_flagged: str, validation: str) -> dict[str, str]:
    return {
        _series(spec.PREDICTIONS, **SVC, model_version="3", decision="flagged"): flagged,
        _series(spec.PREDICTIONS, **SVC, model_version="3", decision="not_flagged"): not_flagged,
        _series(spec.VALIDATION_POSITIVE_RATE, **SVC, model_version="3"): validation,
    }


CRITICAL, WARNING = {"severity": "critical"}, {"severity": "warning"}

CASES = (
    Case("down for 2 minutes", "ReadmissionServiceDown", {_series("up", **SVC): "1 1 0x10"}, "6m", (SVC | CRITICAL,)),
    Case("down for 1 minute: pending", "ReadmissionServiceDown", {_series("up", **SVC): "1 1 0x10"}, "3m", ()),
    Case("up", "ReadmissionServiceDown", {_series("up", **SVC): "1x10"}, "10m", ()),
    Case("no model for 5 minutes", "ReadmissionNoReadyModel", {_series(spec.READY, **SVC): "0x10"}, "6m",
         ({"instance": SVC["instance"]} | CRITICAL,)),  # fmt: skip
    Case("a model", "ReadmissionNoReadyModel", {_series(spec.READY, **SVC): "0 1x10"}, "10m", ()),
    Case("10 % 5xx", "ReadmissionHighErrorRate", _requests("0+90x20", "0+10x20"), "10m",
         ({"instance": SVC["instance"]} | WARNING,)),  # fmt: skip
    Case("1 % 5xx", "ReadmissionHighErrorRate", _requests("0+99x20", "0+1x20"), "10m", ()),
    Case("p99 750 ms", "ReadmissionLatencyHigh", _durations("0x30", "0x30", "0+10x30"), "15m",
         ({"endpoint": "/predict"} | WARNING,)),  # fmt: skip
    Case("every request under 400 ms", "ReadmissionLatencyHigh", _durations("0+10x30", "0+10x30", "0+10x30"), "15m", ()),
    Case("a failed load", "ReadmissionModelReloadFailed",
         {_series(spec.RELOADS, **SVC, outcome="failed"): "0 0 0 1x10"}, "5m", (SVC | {"outcome": "failed"} | WARNING,)),
    Case("loads that succeed", "ReadmissionModelReloadFailed",
         {_series(spec.RELOADS, **SVC, outcome="loaded"): "0 1 2x10", _series(spec.RELOADS, **SVC, outcome="failed"): "0x12"},
         "10m", ()),  # fmt: skip
    Case("5 predictions dropped", "ReadmissionPredictionLogDrops", {_series(spec.LOG_DROPPED, **SVC): "0 0 5x10"}, "5m",
         (SVC | WARNING,)),  # fmt: skip
    Case("drops 20 minutes ago", "ReadmissionPredictionLogDrops", {_series(spec.LOG_DROPPED, **SVC): "0 0 5x30"}, "25m", ()),
    Case("flags 50 % against 20 % on validation", "ReadmissionPositiveRateShift",
         _predictions("0+50x90", "0+50x90", "0.2x90"), "80m", ({"model_version": "3"} | WARNING,)),
    Case("flags 50 % against 45 %", "ReadmissionPositiveRateShift", _predictions("0+50x90", "0+50x90", "0.45x90"), "80m", ()),
    Case("too few predictions to tell", "ReadmissionPositiveRateShift", _predictions("0+1x90", "0+1x90", "0.2x90"), "80m", ()),
    # Availability: 2 % errors burn the budget at 20×: both the page (1h/5m) and the ticket (1d/2h) fire.
    Case("2 % errors", "ReadmissionErrorsBudgetBurn", _requests("0+980x60", "0+20x60"), "30m", (CRITICAL, WARNING)),
    # 0.5 % burns at 5×: the ticket's 3× pair fires, the page's 14.4× and 6× do not.
    Case("0.5 % errors", "ReadmissionErrorsBudgetBurn", _requests("0+995x90", "0+5x90"), "80m", (WARNING,)),
    # An hour clean, then five minutes at 5 %: the short windows are over, the long ones below: no page.
    Case("a 5-minute blip", "ReadmissionErrorsBudgetBurn", _requests("0+950x65", "0+0x60 0+50x5"), "65m", ()),
    # An hour at 5 %, then 35 minutes clean: the short windows reset the page; the ticket's long windows still burn.
    Case("a burn that stopped", "ReadmissionErrorsBudgetBurn", _requests("0+950x60 57000+1000x35", "0+50x60 3000x35"),
         "95m", (WARNING,)),  # fmt: skip
    Case("no errors", "ReadmissionErrorsBudgetBurn", _requests("0+1000x60", "0x60"), "60m", ()),
    # Latency p95 (budget 5 %): 80 % of requests over 400 ms burns at 16×.
    Case("80 % over 400 ms", "ReadmissionLatencyP95BudgetBurn", _durations("0+20x60", "0+20x60", "0+100x60"), "30m",
         (CRITICAL, WARNING)),  # fmt: skip
    Case("2 % over 400 ms", "ReadmissionLatencyP95BudgetBurn", _durations("0+98x60", "0+98x60", "0+100x60"), "60m", ()),
    # Latency p99 (budget 1 %): 8 % over 500 ms burns at 8×: the page's 6h/30m pair and the ticket fire.
    Case("8 % over 500 ms", "ReadmissionLatencyP99BudgetBurn", _durations("0+92x60", "0+92x60", "0+100x60"), "45m",
         (CRITICAL, WARNING)),  # fmt: skip
    Case("0.5 % over 500 ms", "ReadmissionLatencyP99BudgetBurn", _durations("0+99x60", "0+199x60", "0+200x60"), "60m", ()),
    # The exporter serves the last ingestion's time once a batch was ingested, and no sample of it before: "never" is
    # an absent series, not 0. Every series steps 5 minutes; 26h is 93,600 s.
    Case("batches waiting, the last ingestion 26 hours ago", "ReadmissionIngestionStale",
         {_series(pipeline.LAST_INGESTION, job=spec.PIPELINE_JOB): "0x320",
          _series(pipeline.BATCHES_WAITING, job=spec.PIPELINE_JOB): "2x320"},
         "26h", ({"job": spec.PIPELINE_JOB} | WARNING,), "5m"),  # fmt: skip
    Case("batches waiting for 40 minutes, nothing ever ingested", "ReadmissionIngestionStale",
         {_series(pipeline.BATCHES_WAITING, job=spec.PIPELINE_JOB): "2x20"}, "40m", ({"job": spec.PIPELINE_JOB} | WARNING,),
         "5m"),  # fmt: skip
    Case("batches waiting for 20 minutes, nothing ever ingested: pending", "ReadmissionIngestionStale",
         {_series(pipeline.BATCHES_WAITING, job=spec.PIPELINE_JOB): "2x20"}, "20m", (), "5m"),  # fmt: skip
    Case("batches waiting, one ingested 10 minutes ago", "ReadmissionIngestionStale",
         {_series(pipeline.LAST_INGESTION, job=spec.PIPELINE_JOB): "0x310 93000x10",
          _series(pipeline.BATCHES_WAITING, job=spec.PIPELINE_JOB): "2x320"}, "26h", (), "5m"),  # fmt: skip
    Case("nothing waiting", "ReadmissionIngestionStale",
         {_series(pipeline.LAST_INGESTION, job=spec.PIPELINE_JOB): "0x320",
          _series(pipeline.BATCHES_WAITING, job=spec.PIPELINE_JOB): "0x320"}, "26h", (), "5m"),  # fmt: skip
    Case("nothing landed, nothing ever ingested", "ReadmissionIngestionStale",
         {_series(pipeline.BATCHES_WAITING, job=spec.PIPELINE_JOB): "0x20"}, "40m", (), "5m"),  # fmt: skip
)


def _annotations(alert: spec.Alert, labels: dict[str, str], runbook_base: str) -> dict[str, str]:
    description = alert.description
    for key, value in labels.items():
        description = description.replace(f"{{{{ $labels.{key} }}}}", value)
    return {"summary": alert.summary, "description": description, "runbook_url": runbook_base + alert.runbook}


def promtool_tests(rule_file: str = "../rules.yml", runbook_base: str = "") -> dict[str, dict]:
    """The files `promtool test rules` reads, one per evaluation interval, by name: one test group per case."""
    files: dict[str, dict] = {}
    for case in CASES:
        name = "rules.test.yml" if case.interval == "1m" else f"rules-{case.interval}.test.yml"
        tests = files.setdefault(name, {"rule_files": [rule_file], "evaluation_interval": case.interval, "tests": []})["tests"]
        by_severity = {alert.severity: alert for alert in spec.ALERTS if alert.name == case.alert}
        tests.append(
            {
                "name": f"{case.alert}: {case.name}",
                "interval": case.interval,
                "input_series": [{"series": series, "values": values} for series, values in case.series.items()],
                "alert_rule_test": [
                    {
                        "eval_time": case.at,
                        "alertname": case.alert,
                        "exp_alerts": [
                            {"exp_labels": labels,
                             "exp_annotations": _annotations(by_severity[labels["severity"]], labels, runbook_base)}
                            for labels in case.fires
                        ],  # fmt: skip
                    }
                ],
            }
        )
    return files
