"""Start and stop `bentoml serve` on the platform's state, for `readmission serve`, the demo, tests and benchmarks."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlsplit

import httpx

from readmission_platform.serving.package import REPOSITORY
from readmission_platform.settings import Settings

BENTO = "readmission:latest"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def serve_command(settings: Settings, *, bento: str | None, port: int, workers: int | None = None) -> tuple[list[str], dict[str, str], Path]:
    """The `bentoml serve` command, its environment and working folder: a built Bento (`bento`, e.g.
    'readmission:latest') from the platform's store, or with `bento=None` the service from the repository."""
    executable = str(Path(sys.executable).with_name("bentoml"))
    env = {**os.environ, "READMISSION_HOME": str(settings.home), "BENTOML_HOME": str(settings.bentoml_home)}
    if workers is not None:
        env["READMISSION_SERVE_WORKERS"] = str(workers)
    target = bento if bento is not None else "."
    return [executable, "serve", target, "--host", "127.0.0.1", "--port", str(port)], env, REPOSITORY


@contextmanager
def running_server(
    settings: Settings,
    *,
    bento: str | None = BENTO,
    port: int | None = None,
    env: Mapping[str, str] | None = None,
    ready_within: float = 120.0,
    log_path: Path | None = None,
    wait_for: str = "/readyz",
) -> Iterator[str]:
    """`bentoml serve` in the background until the block ends; yields its base URL once `wait_for` answers 200
    (/readyz: a model is loaded; /livez: the server is up).

    Stops it with SIGTERM, as a process manager would, so each worker flushes its prediction log.
    """
    port = port or free_port()
    command, environment, folder = serve_command(settings, bento=bento, port=port)
    environment |= dict(env or {})
    log_path = log_path or settings.home / "logs" / f"bentoml-serve-{port}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    url = f"http://127.0.0.1:{port}"
    with open(log_path, "wb") as output:
        process = subprocess.Popen(command, env=environment, cwd=folder, stdout=output, stderr=subprocess.STDOUT,
                                   start_new_session=True)  # fmt: skip
        try:
            wait_until_answering(process, f"{url}{wait_for}", "bentoml serve", ready_within, log_path)
            yield url
        finally:
            stop(process)


def wait_until_answering(process: subprocess.Popen, url: str, name: str, within: float, log_path: Path) -> None:
    """Return once `url` answers 200; RuntimeError if the process exits first, TimeoutError after `within` seconds."""
    deadline = time.monotonic() + within
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"{name} exited with {process.returncode}; see {log_path}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, timeout=2).status_code == 200:
                return
        if time.monotonic() > deadline:
            raise TimeoutError(f"{name} did not answer {urlsplit(url).path} within {within:.0f} s; see {log_path}")
        time.sleep(0.3)


def stop(process: subprocess.Popen, timeout: float = 30.0) -> None:
    """SIGTERM to the server's process group (the workers too), SIGKILL if it has not stopped within `timeout`."""
    if process.poll() is not None:
        return
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
