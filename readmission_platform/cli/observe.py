"""`readmission observe`: Prometheus and Alertmanager on the platform's state, and the pipeline's metrics beside them."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass

from readmission_platform.settings import ALERTMANAGER_PORT, PIPELINE_METRICS_PORT, PROMETHEUS_PORT, Settings


@dataclass(frozen=True)
class Ports:
    prometheus: int = PROMETHEUS_PORT
    alertmanager: int = ALERTMANAGER_PORT
    pipeline: int = PIPELINE_METRICS_PORT  # the port OpenTelemetry's and many exporters' Prometheus endpoints default to


def observe(settings: Settings, say: Callable[[str], None], *, service: list[str], webhook: str, ports: Ports,
            stopping: threading.Event | None = None, **timing: str) -> int:  # fmt: skip
    """Serve the pipeline's metrics, start Alertmanager and Prometheus (configuration and data under
    READMISSION_HOME/observe), until Ctrl-C or `stopping` is set; `timing` as `servers.write_config` takes it."""
    import dagster as dg
    import prometheus_client

    from readmission_platform.cli.instance import prepare_dagster_home
    from readmission_platform.ops import servers
    from readmission_platform.ops.pipeline import registry_for

    prepare_dagster_home(settings)
    folder = settings.home / "observe"
    registry = registry_for(dg.DagsterInstance.get(), settings.landing_dir)
    exporter, thread = prometheus_client.start_http_server(ports.pipeline, addr="127.0.0.1", registry=registry)
    manager_address, prometheus_address = f"127.0.0.1:{ports.alertmanager}", f"127.0.0.1:{ports.prometheus}"
    prometheus_config, alertmanager_config = servers.write_config(
        folder, service=service, pipeline=[f"127.0.0.1:{ports.pipeline}"], alertmanager=manager_address,
        prometheus=prometheus_address, webhook=webhook, **timing,
    )  # fmt: skip
    stopping = stopping or threading.Event()
    try:
        with (
            servers.running(servers.alertmanager_command(alertmanager_config, folder / "alertmanager", manager_address),
                            manager_address, settings.home / "logs" / "alertmanager.log") as manager,
            servers.running(servers.prometheus_command(prometheus_config, folder / "prometheus", prometheus_address),
                            prometheus_address, settings.home / "logs" / "prometheus.log") as prometheus,
        ):  # fmt: skip
            if threading.current_thread() is threading.main_thread():
                for stop in (signal.SIGINT, signal.SIGTERM):
                    signal.signal(stop, lambda *_: stopping.set())
            say(f"Prometheus on {prometheus} scraping {', '.join(service)} and the pipeline's metrics "
                f"(http://127.0.0.1:{ports.pipeline}/metrics); Alertmanager on {manager} sending to {webhook}. "
                f"Set READMISSION_ALERTMANAGER_URL={manager} for the pipeline's sensors. Ctrl-C stops them.")  # fmt: skip
            stopping.wait()
    finally:
        with contextlib.suppress(Exception):
            exporter.shutdown()
    return 0
