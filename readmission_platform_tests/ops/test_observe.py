"""`readmission observe` end to end: a real Prometheus scrapes a real `bentoml serve` and the pipeline's metrics;
planted errors make the availability alerts fire and planted slow requests the latency alerts, each reaching a webhook
through a real Alertmanager, as does a failed Dagster run; every dashboard panel's query then returns data."""

from __future__ import annotations

import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import dagster as dg
import httpx
import pytest

from readmission_platform.cli.observe import Ports, observe
from readmission_platform.defs.monitoring.sensors import alert_on_run_failure
from readmission_platform.defs.resources import AlertmanagerResource
from readmission_platform.ops import dashboards
from readmission_platform.ops.spec import PIPELINE_ALERTS
from readmission_platform.serving.server import free_port, running_server
from readmission_platform_tests.ops.conftest import Webhook
from readmission_platform_tests.serving.conftest import register, registry_of, settings_in, test_encounters  # noqa: F401 (a fixture)

pytestmark = pytest.mark.observability
# A stall and the run between two: a scrape caught by a stall still answers within Prometheus' one-second timeout.
STALL_SECONDS, RUN_SECONDS = 0.6, 0.15


@dg.asset
def failing_ingestion() -> None:
    raise ValueError("batch_0009.csv: header lacks 'age'")


def query(prometheus: str, expr: str) -> list[dict]:
    answer = httpx.get(f"{prometheus}/api/v1/query", params={"query": expr}, timeout=30).json()
    assert answer["status"] == "success", f"{expr!r}: {answer}"
    return answer["data"]["result"]


def wait_until(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} within {timeout:.0f} s")
        time.sleep(1)


def test_errors_and_a_failed_run_reach_the_webhook_and_every_panel_has_data(
    tmp_path, monkeypatch, webhook: Webhook, sample_candidates, sample_parts, test_encounters
):
    settings = settings_in(tmp_path / "home")
    # observe points DAGSTER_HOME at the home and loads the definitions, which read READMISSION_HOME: restored after.
    monkeypatch.setenv("DAGSTER_HOME", str(settings.dagster_home))
    monkeypatch.setenv("READMISSION_HOME", str(settings.home))
    registry = registry_of(settings)
    version = register(registry, sample_candidates["hist_gradient_boosting"], sample_parts, promote=False)
    challenger = register(registry, sample_candidates["logistic_regression"], sample_parts, promote=False)
    encounters, _ = test_encounters
    (settings.landing_dir).mkdir(parents=True)
    (settings.landing_dir / "batch_0002.csv").write_text("waiting\n")

    env = {"READMISSION_RELOAD_SECONDS": "1"}
    with running_server(settings, bento=None, env=env, wait_for="/livez") as service:
        ports = Ports(free_port(), free_port(), free_port())
        stopping = threading.Event()
        failures: list[BaseException] = []

        def run_observe(*args, **kwargs) -> None:
            try:
                observe(*args, **kwargs)
            except BaseException as error:
                failures.append(error)
                raise

        watching = threading.Thread(
            target=run_observe, args=(settings, print),
            kwargs={"service": [service.removeprefix("http://")], "webhook": webhook.url, "ports": ports,
                    "stopping": stopping, "interval": "1s", "group_wait": "1s", "hold": "0s"},
        )  # fmt: skip
        watching.start()
        prometheus, alertmanager = f"http://127.0.0.1:{ports.prometheus}", f"http://127.0.0.1:{ports.alertmanager}"
        try:
            wait_until(lambda: _ready(prometheus) or failures, 60, "Prometheus was not ready")
            assert not failures, f"readmission observe failed: {failures[0]!r}"
            wait_until(lambda: len(query(prometheus, "up == 1")) == 4, 60, "Prometheus did not scrape all four targets")

            # Planted errors: no version is in production yet, so every prediction is a 503. Spread over several
            # scrapes, as a rate only sees what a counter gains after Prometheus first saw it.
            with httpx.Client(base_url=service, timeout=30) as client:
                for n, encounter in enumerate(encounters[:80]):
                    assert client.post("/predict", json=encounter).status_code == 503
                    if n % 10 == 0:  # and a refused body now and then, for the refusals' panel
                        assert client.post("/predict", json={}).status_code == 400
                    time.sleep(0.1)
            webhook.wait_for("ReadmissionNoReadyModel", timeout=90, severity="critical")
            webhook.wait_for("ReadmissionErrorsBudgetBurn", timeout=90, severity="critical")

            # Traffic to a version: single encounters spread over several scrapes, and a batch.
            registry.promote(version, reason="test: observe")
            wait_until(lambda: httpx.get(f"{service}/readyz").status_code == 200, 60, "the service loaded no model")
            # And a challenger in shadow, for the rollout's panels: scored beside production, never answering.
            registry.start_shadow(challenger, reason="test: observe a rollout")
            wait_until(lambda: (httpx.get(f"{service}/model").json().get("candidate") or {}).get("loaded"), 60,
                       "the service loaded no shadow")  # fmt: skip
            with ThreadPoolExecutor(4) as pool, httpx.Client(base_url=service, timeout=60) as client:
                for start in range(0, 400, 50):
                    chunk = encounters[start : start + 50]
                    assert set(pool.map(lambda e: client.post("/predict", json=e).status_code, chunk)) == {200}
                    time.sleep(0.5)
                assert client.post("/predict_batch", json={"encounters": encounters}).status_code == 200

            # Planted slow requests: the worker stalls (stopped, as a starved or paging process would be) for longer
            # than the SLO's 500 ms, again and again with short runs between, so that many requests it has taken
            # are caught by a stall; every one still succeeds.
            worker = httpx.get(f"{service}/model", timeout=30).json()["worker_pid"]
            stalling = threading.Event()

            def stall() -> None:
                while not stalling.wait(RUN_SECONDS):
                    os.kill(worker, signal.SIGSTOP)
                    time.sleep(STALL_SECONDS)
                    os.kill(worker, signal.SIGCONT)

            staller = threading.Thread(target=stall)
            staller.start()
            try:
                with ThreadPoolExecutor(8) as pool, httpx.Client(base_url=service, timeout=60) as client:
                    deadline = time.monotonic() + 8
                    while time.monotonic() < deadline:
                        chunk = encounters[:64]
                        assert set(pool.map(lambda e: client.post("/predict", json=e).status_code, chunk)) == {200}
            finally:
                stalling.set()
                staller.join()
                os.kill(worker, signal.SIGCONT)
            webhook.wait_for("ReadmissionLatencyHigh", timeout=90, severity="warning", endpoint="/predict")
            # The p99 SLO's burn: a ticket, or a page when the stalls caught enough requests to burn at the page's rate
            # (how many they catch depends on the machine's load); a page inhibits the ticket of the same alert, so either
            # may arrive.
            burn = webhook.wait_for("ReadmissionLatencyP99BudgetBurn", timeout=90)
            assert burn["labels"]["severity"] in {"warning", "critical"}

            # A failed run of the pipeline, posted by its sensor to the same Alertmanager.
            instance = dg.DagsterInstance.get()
            failed = dg.materialize([failing_ingestion], instance=instance, raise_on_error=False)
            instance.report_runless_asset_event(dg.AssetMaterialization("raw_batches", partition="batch_0001"))
            failure = instance.get_records_for_run(failed.run_id, of_type=dg.DagsterEventType.RUN_FAILURE).records[0]
            context = dg.build_run_status_sensor_context(
                sensor_name="alert_on_run_failure", dagster_instance=instance, dagster_run=instance.get_run_by_id(failed.run_id),
                dagster_event=failure.event_log_entry.dagster_event, resources={"alertmanager": AlertmanagerResource(url=alertmanager)},
            ).for_run_failure()  # fmt: skip
            alert_on_run_failure(context)
            webhook.wait_for(PIPELINE_ALERTS["run"].name, timeout=60, run_id=failed.run_id)

            time.sleep(3)  # two more scrapes of the pipeline's metrics, now with the failed run
            empty = [
                f"{title} / {panel['title']}: {target['expr']}"
                for title, board in ((b["title"], b) for b in dashboards.DASHBOARDS.values())
                for panel in board["panels"]
                for target in panel["targets"]
                if not query(prometheus, target["expr"])
            ]
            assert not empty, "panels without data (a metric the service or pipeline does not expose?):\n" + "\n".join(empty)
        finally:
            stopping.set()
            watching.join(60)
    routed = {(a["labels"]["alertname"], a["labels"]["severity"]) for a in webhook.alerts()}
    assert ("ReadmissionServiceDown", "critical") not in routed
    receivers = {n["receiver"] for n in webhook.notifications if n["status"] == "firing"}
    assert {"page", "ticket"} <= receivers


def _ready(prometheus: str) -> bool:
    try:
        return httpx.get(f"{prometheus}/-/ready", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False
