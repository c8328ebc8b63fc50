"""The production profile on one machine, from `deploy/spec.py`: every component its own process, with its own working
directory and home under `root`, speaking PostgreSQL, gRPC and HTTP on loopback; the landing folder the one shared.

`python -m readmission_platform.deploy.local --root DIR` runs it until Ctrl-C, with the databases' URLs from the
environment (the variables of `spec.DATABASES`; READMISSION_API_TOKEN, READMISSION_PATIENT_KEY and
READMISSION_ALERTMANAGER_URL if set); the tests and `benchmarks/bench_deploy.py` use `Profile` directly.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from readmission_platform.deploy import spec
from readmission_platform.serving.server import free_port, stop, wait_until_answering
from readmission_platform.settings import PRIVATE_UMASK

REPO_ROOT = Path(__file__).resolve().parents[2]
HOST = "127.0.0.1"
# What a component's process must not inherit from whoever starts the profile: its settings come from the spec alone.
INHERITED_PREFIXES = ("READMISSION_", "DAGSTER_", "MLFLOW_", "BENTOML_")


@dataclass
class Running:
    """A started component: its process, port, working directory and log."""

    name: str
    process: subprocess.Popen
    port: int | None
    folder: Path
    log: Path
    env: dict[str, str] = field(repr=False)

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"


def _bin(name: str) -> str:
    return str(Path(sys.executable).with_name(name))


def _private_folder(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    path.chmod(0o700)
    return path


class Profile:
    """Starts the profile's components under `root` (one folder each) on the PostgreSQL databases `databases`
    (variable → URL, every key of `spec.DATABASES`); `landing` is the shared landing folder."""

    def __init__(
        self,
        root: Path,
        databases: Mapping[str, str],
        *,
        landing: Path | None = None,
        replicas: int = spec.SERVICE.replicas,
        token: str | None = None,
        patient_key: str | None = None,
        alertmanager_url: str | None = None,
        reload_seconds: float | None = None,
        concurrency: int = spec.WAREHOUSE_CONCURRENCY,
        extra_env: Mapping[str, str] | None = None,
    ) -> None:
        missing = sorted(set(spec.DATABASES) - set(databases))
        if missing:
            raise ValueError(f"the profile needs a PostgreSQL URL for {', '.join(missing)}; see deploy/spec.py DATABASES")
        for name, url in databases.items():
            if not url.startswith(("postgresql://", "postgres://", "postgresql+")):
                raise ValueError(f"{name} is {url.split('@')[-1]!r}; the production profile keeps it in PostgreSQL")
        self.root = root.resolve()
        self.databases = dict(databases)
        self.landing = (landing or self.root / "landing").resolve()
        self.replicas, self.token, self.reload_seconds = replicas, token, reload_seconds
        self.patient_key, self.alertmanager_url = patient_key, alertmanager_url
        self.concurrency = concurrency
        self.extra_env = dict(extra_env or {})
        self.running: dict[str, Running] = {}

    # -- environment ------------------------------------------------------------------------------------------------
    def _base_env(self) -> dict[str, str]:
        return {k: v for k, v in os.environ.items() if not k.startswith(INHERITED_PREFIXES)} | self.extra_env

    def secrets(self) -> dict[str, str]:
        """The values the Secret holds on Kubernetes: the databases, the tracking server's URL, the token, the patient
        key and Alertmanager's URL (the last three optional: empty, a component starts without them)."""
        values = dict(self.databases)
        if "mlflow" in self.running:
            values[spec.TRACKING_URL] = self.running["mlflow"].url
        values["READMISSION_API_TOKEN"] = self.token or ""
        values[spec.PATIENT_KEY] = self.patient_key or ""
        values[spec.ALERTMANAGER_URL] = self.alertmanager_url or ""
        return values

    def environment(self, component: spec.Component, folder: Path) -> dict[str, str]:
        """The component's environment as the spec names it: its secrets, its configuration, its own homes."""
        secrets = self.secrets()
        env = self._base_env() | {name: secrets[name] for name in component.secrets if secrets.get(name)}
        env |= component.config
        if component is spec.MLFLOW:
            env["MLFLOW_ARTIFACTS_DESTINATION"] = str(_private_folder(folder / "artifacts"))
        if component.needs_landing:
            env["READMISSION_LANDING_DIR"] = str(self.landing)
        homes = {"READMISSION_HOME": folder / "home", "DAGSTER_HOME": folder / "dagster", "BENTOML_HOME": folder / "bentoml"}
        for name in component.homes:
            env[name] = str(_private_folder(homes[name]))
        if "DAGSTER_HOME" in component.homes:
            (homes["DAGSTER_HOME"] / "dagster.yaml").write_text(yaml.safe_dump(spec.instance_config(concurrency=self.concurrency), sort_keys=False))
        if component is spec.SERVICE and self.reload_seconds is not None:
            env["READMISSION_RELOAD_SECONDS"] = str(self.reload_seconds)
        return env

    # -- processes --------------------------------------------------------------------------------------------------
    def _start(self, name: str, component: spec.Component, *, workspace: str = "", wait: bool = True,
               ready_within: float = 600.0) -> Running:  # fmt: skip
        folder = _private_folder(self.root / name)
        port = free_port() if component.port else None
        env = self.environment(component, folder)
        command = component.command_for(host=HOST, port=port, app=str(REPO_ROOT), workspace=workspace)
        command[0] = _bin(command[0])
        log = folder / f"{name}.log"
        previous = os.umask(PRIVATE_UMASK)
        try:
            with open(log, "ab") as output:
                process = subprocess.Popen(command, cwd=folder, env=env, stdout=output, stderr=subprocess.STDOUT,
                                           start_new_session=True)  # fmt: skip
        finally:
            os.umask(previous)
        running = Running(name, process, port, folder, log, env)
        self.running[name] = running
        if not wait:
            return running
        if component.health:
            wait_until_answering(process, f"{running.url}{component.health}", name, ready_within, log)
        elif component is spec.CODE_SERVER:
            _wait_for_code_server(process, port, ready_within, log)
        return running

    def start_backends(self) -> None:
        """The tracking server, the code location, the webserver, the daemon and the pipeline's exporter."""
        _private_folder(self.root)
        _private_folder(self.landing)
        self._start("mlflow", spec.MLFLOW)
        code = self._start("code-location", spec.CODE_SERVER)
        for each in (spec.WEBSERVER, spec.DAEMON):
            folder = _private_folder(self.root / each.name)
            workspace = folder / "workspace.yaml"
            workspace.write_text(yaml.safe_dump(spec.workspace_config(HOST, code.port), sort_keys=False))
            self._start(each.name, each, workspace=str(workspace))
        self._start(spec.PIPELINE_EXPORTER.name, spec.PIPELINE_EXPORTER)

    def start_service(self, replica: int, *, wait_for: str = "/livez") -> Running:
        """Replica `replica` (1, 2, …) of the service: `wait_for` /livez (up) or /readyz (a model loaded)."""
        name = f"service-{replica}"
        running = self._start(name, spec.SERVICE, wait=False)
        wait_until_answering(running.process, f"{running.url}{wait_for}", name, 600.0, running.log)
        return running

    def start(self) -> Profile:
        self.start_backends()
        for replica in range(1, self.replicas + 1):
            self.start_service(replica)
        return self

    def kill(self, name: str) -> None:
        """SIGKILL a component and everything it started (a crash, not a stop)."""
        running = self.running[name]
        # Its whole tree: BentoML's workers, holding the listening socket, are not all in its process group.
        import psutil

        with contextlib.suppress(psutil.NoSuchProcess):
            tree = [psutil.Process(running.process.pid), *psutil.Process(running.process.pid).children(recursive=True)]
            for process in tree:
                with contextlib.suppress(psutil.NoSuchProcess):
                    process.kill()
            psutil.wait_procs(tree, timeout=30)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(running.process.pid, signal.SIGKILL)
        running.process.wait()

    def stop(self) -> None:
        """SIGTERM every component, services first, the tracking server last."""
        for name in reversed(list(self.running)):
            stop(self.running[name].process)

    def __enter__(self) -> Profile:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def dagster(self, *arguments: str) -> str:
        """Run the `dagster` CLI against the instance and the code location, as the daemon sees them (e.g.
        `sensor stop retrain_sensor`); its output."""
        daemon = self.running["dagster-daemon"]
        command = [_bin("dagster"), *arguments, "-w", str(daemon.folder / "workspace.yaml")]
        done = subprocess.run(command, cwd=daemon.folder, env=daemon.env, capture_output=True, text=True, timeout=300)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(arguments)} failed: {done.stderr.strip()[-1000:]}")
        return done.stdout


def _wait_for_code_server(process: subprocess.Popen, port: int, within: float, log: Path) -> None:
    # The standard gRPC health service, which a Dagster code server reports on under "DagsterApi" once it serves
    # (what `dagster api grpc-health-check`, the chart's probe, asks).
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = time.monotonic() + within
    with grpc.insecure_channel(f"{HOST}:{port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"the code server exited with {process.returncode}; see {log}")
            with contextlib.suppress(grpc.RpcError):
                answer = health.Check(health_pb2.HealthCheckRequest(service="DagsterApi"), timeout=5)
                if answer.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            if time.monotonic() > deadline:
                raise TimeoutError(f"the code server did not answer on port {port} within {within:.0f} s; see {log}")
            time.sleep(0.5)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, required=True, help="one folder per component is made here")
    parser.add_argument("--landing", type=Path, help="the shared landing folder (default ROOT/landing)")
    parser.add_argument("--replicas", type=int, default=spec.SERVICE.replicas)
    args = parser.parse_args(argv)
    databases = {name: os.environ.get(name, "") for name in spec.DATABASES}
    try:
        profile = Profile(args.root, databases, landing=args.landing, replicas=args.replicas,
                          token=os.environ.get("READMISSION_API_TOKEN"), patient_key=os.environ.get(spec.PATIENT_KEY),
                          alertmanager_url=os.environ.get(spec.ALERTMANAGER_URL))  # fmt: skip
        stopping = threading.Event()
        for each in (signal.SIGINT, signal.SIGTERM):
            signal.signal(each, lambda *_: stopping.set())
        with profile:
            for name, running in profile.running.items():
                where = running.url if running.port else "no port"
                print(f"{name}: pid {running.process.pid}, {where}, folder {running.folder}", flush=True)
            print(f"landing folder {profile.landing}. Ctrl-C stops every component.", flush=True)
            stopping.wait()
    except (ValueError, RuntimeError, TimeoutError, OSError) as error:
        print(f"profile: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
