"""A webhook receiver (what a team's pager or chat would be) and a real Alertmanager routing to it."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from readmission_platform.ops import generate, servers
from readmission_platform.serving.server import free_port


@dataclass
class Webhook:
    url: str
    notifications: list[dict] = field(default_factory=list)

    def alerts(self) -> list[dict]:
        """Every alert of every notification received, as Alertmanager sent it (labels, annotations, status)."""
        return [alert for notification in self.notifications for alert in notification["alerts"]]

    def wait_for(self, name: str, timeout: float, **labels: str) -> dict:
        """The first firing alert `name` with these labels to arrive within `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for alert in self.alerts():
                if alert["status"] == "firing" and alert["labels"].get("alertname") == name and labels.items() <= alert["labels"].items():
                    return alert
            time.sleep(0.5)
        got = sorted({a["labels"]["alertname"] for a in self.alerts()})
        raise AssertionError(f"no firing {name} {labels} reached the webhook within {timeout:.0f} s; it got {got}")


@pytest.fixture
def webhook() -> Iterator[Webhook]:
    received = Webhook(url="")

    class Receiver(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            received.notifications.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Receiver)
    received.url = f"http://127.0.0.1:{server.server_address[1]}/alerts"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield received
    server.shutdown()


@pytest.fixture
def alertmanager(tmp_path: Path, webhook: Webhook) -> Iterator[str]:
    """A real Alertmanager with the generated routes, every receiver the test's webhook, notifying within a second."""
    config = tmp_path / "alertmanager.yml"
    config.write_text(generate.to_yaml(generate.alertmanager_config(webhook=webhook.url, group_wait="1s")))
    address = f"127.0.0.1:{free_port()}"
    command = servers.alertmanager_command(config, tmp_path / "alertmanager-data", address)
    with servers.running(command, address, tmp_path / "alertmanager.log") as url:
        yield url
