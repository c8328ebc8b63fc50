"""The production profile, described once: every component's command, environment, port and health route.

`deploy/local.py` starts it on one machine from this description, and `deploy/generate.py` writes the compose file
and the Kubernetes manifests from it, so what the tested profile runs is what the manifests run. No two components
share a folder: each has its own home (READMISSION_HOME, DAGSTER_HOME, BENTOML_HOME); they speak PostgreSQL, gRPC
(the code server) and HTTP (the tracking server, the service). The one folder shared by design is the landing area.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from readmission_platform.settings import PIPELINE_METRICS_PORT

# Every PostgreSQL database of the profile: the variable that names it, and what keeps its tables.
DATABASES = {
    "READMISSION_WAREHOUSE_URL": "the warehouse (raw, clean, features, decisions, outcomes)",
    "READMISSION_DAGSTER_STORAGE_URL": "Dagster's runs, events, schedules and concurrency slots (dagster-postgres)",
    "MLFLOW_BACKEND_STORE_URI": "MLflow's tracking store and model registry (the tracking server's alone)",
    "READMISSION_PREDICTION_LOG_URL": "the service's prediction log",
}

# Runs side by side, and slots of the pool `warehouse`: PostgreSQL takes batches in parallel (README, Warehouse).
WAREHOUSE_CONCURRENCY = 4
CODE_LOCATION = "readmission_platform"
DEFINITIONS_MODULE = "readmission_platform.definitions"
SERVICE_TARGET = "readmission_platform.serving.service:ReadmissionService"

# Images: the code location's (also the tracking server's, webserver's and daemon's on compose: it holds MLflow and
# Dagster at the versions the code was tested with) and the service's.
CODE_IMAGE = "readmission-platform/code-location"
SERVICE_IMAGE = "readmission-platform/service"
# Inside the images: the source, and each component's own home.
APP_DIR = "/app"
HOME_DIR = "/var/lib/readmission"
LANDING_DIR = "/landing"
ARTIFACTS_DIR = "/var/lib/mlflow/artifacts"

# The images' user (Dockerfile `USER`), not root; on Kubernetes also the group that owns the volumes it writes (fsGroup).
APP_UID = 10001

# The names of the Secret (Kubernetes) / env file (compose) holding the URLs, the token and the key, and what reads them.
SECRET_NAME = "readmission-platform"
TRACKING_URL = "READMISSION_MLFLOW_TRACKING_URI"
# The key of the HMAC that stands for a patient identifier: the pipeline (patient_history) and the service must share it.
PATIENT_KEY = "READMISSION_PATIENT_KEY"
# Where the pipeline's alert sensors post (they run in the code location's process); unset, they log and skip.
ALERTMANAGER_URL = "READMISSION_ALERTMANAGER_URL"
# Secrets a component starts without: an open service, no patient history, alerts only logged.
OPTIONAL_SECRETS = ("READMISSION_API_TOKEN", PATIENT_KEY, ALERTMANAGER_URL)


@dataclass(frozen=True)
class Component:
    """One process of the profile. `command` holds `{host}`, `{port}` and the folders below as placeholders, filled
    by `command_for`; `secrets` are variables whose values are credentials or URLs (a Secret on Kubernetes), `config`
    variables the same on every target, `homes` variables that name this component's own folders."""

    name: str
    command: tuple[str, ...]
    image: str
    port: int | None
    health: str | None  # an HTTP route that answers 200 when the process is up; None: gRPC or no port
    secrets: tuple[str, ...] = ()
    config: dict[str, str] = field(default_factory=dict)
    homes: tuple[str, ...] = ()
    needs_landing: bool = False
    replicas: int = 1

    def command_for(self, *, host: str, port: int | None = None, app: str = APP_DIR, workspace: str = "") -> list[str]:
        """The command on a target: `host` to listen on, `port` (default the component's), the source folder `app`."""
        values = {"host": host, "port": str(port or self.port), "app": app, "workspace": workspace}
        return [part.format(**values) for part in self.command]


# The instance settings every Dagster process of the profile reads (the chart's values carry the same on Kubernetes).
INSTANCE_SECRET = "READMISSION_DAGSTER_STORAGE_URL"
CODE_SECRETS = (
    "READMISSION_WAREHOUSE_URL",
    "READMISSION_DAGSTER_STORAGE_URL",
    TRACKING_URL,
    "READMISSION_PREDICTION_LOG_URL",
    PATIENT_KEY,
    ALERTMANAGER_URL,
)

MLFLOW = Component(
    name="mlflow",
    # Proxied artifacts: clients upload and download through this server, which alone writes the destination.
    command=("mlflow", "server", "--host", "{host}", "--port", "{port}", "--serve-artifacts", "--workers", "2"),
    image=CODE_IMAGE,
    port=5000,
    health="/health",
    secrets=("MLFLOW_BACKEND_STORE_URI",),
    # MLflow 3 answers only the Host names it is told (DNS-rebinding protection): its own service's, and loopback.
    config={"MLFLOW_ARTIFACTS_DESTINATION": ARTIFACTS_DIR,
            "MLFLOW_SERVER_ALLOWED_HOSTS": "mlflow,mlflow:*,mlflow.*,localhost:*,127.0.0.1:*"},
)
CODE_SERVER = Component(
    name="code-location",
    command=("dagster", "code-server", "start", "--host", "{host}", "--port", "{port}",
             "--module-name", DEFINITIONS_MODULE, "--location-name", CODE_LOCATION),  # fmt: skip
    image=CODE_IMAGE,
    port=4000,
    health=None,
    secrets=CODE_SECRETS,
    config={"READMISSION_LANDING_DIR": LANDING_DIR},
    homes=("READMISSION_HOME", "DAGSTER_HOME"),
    needs_landing=True,
)
WEBSERVER = Component(
    name="dagster-webserver",
    command=("dagster-webserver", "-w", "{workspace}", "-h", "{host}", "-p", "{port}"),
    image=CODE_IMAGE,
    port=3000,
    health="/server_info",
    secrets=(INSTANCE_SECRET,),
    homes=("DAGSTER_HOME",),
)
DAEMON = Component(
    name="dagster-daemon",
    command=("dagster-daemon", "run", "-w", "{workspace}"),
    image=CODE_IMAGE,
    port=None,
    health=None,
    secrets=(INSTANCE_SECRET,),
    homes=("DAGSTER_HOME",),
)
SERVICE = Component(
    name="service",
    command=("bentoml", "serve", SERVICE_TARGET, "--working-dir", "{app}", "--host", "{host}", "--port", "{port}"),
    image=SERVICE_IMAGE,
    port=3000,
    health="/readyz",
    secrets=(TRACKING_URL, "READMISSION_PREDICTION_LOG_URL", "READMISSION_API_TOKEN", PATIENT_KEY),
    config={"READMISSION_RELOAD_SECONDS": "30", "READMISSION_SERVE_WORKERS": "1"},
    homes=("READMISSION_HOME", "BENTOML_HOME"),
    replicas=2,
)
# The pipeline's metrics (job `readmission-pipeline` of ops/), read from Dagster's storage and the landing folder at
# each scrape; the definitions name the asset checks it reports.
PIPELINE_EXPORTER = Component(
    name="pipeline-exporter",
    command=("python", "-m", "readmission_platform.ops.pipeline", "--host", "{host}", "--port", "{port}"),
    image=CODE_IMAGE,
    port=PIPELINE_METRICS_PORT,
    health="/metrics",
    secrets=(INSTANCE_SECRET,),
    config={"READMISSION_LANDING_DIR": LANDING_DIR},
    homes=("READMISSION_HOME", "DAGSTER_HOME"),
    needs_landing=True,
)
COMPONENTS = (MLFLOW, CODE_SERVER, WEBSERVER, DAEMON, PIPELINE_EXPORTER, SERVICE)
# The service's health routes as BentoML serves them (README, Serving): the probes of its Deployment.
LIVENESS, READINESS = "/livez", "/readyz"
# The autoscaler of the service's Deployment, and what one pod asks for.
HPA_MIN, HPA_MAX, HPA_CPU_PERCENT = 3, 20, 70
SERVICE_RESOURCES = {"requests": {"cpu": "1", "memory": "1Gi"}, "limits": {"cpu": "2", "memory": "2Gi"}}


def instance_config(*, concurrency: int = WAREHOUSE_CONCURRENCY, run_launcher: dict | None = None) -> dict:
    """The Dagster instance of the profile (each Dagster process's dagster.yaml): storage in PostgreSQL, `concurrency`
    runs and `warehouse` slots (four; the benchmark's baseline one), and nothing written to another process's folder: the artifact root is each process's own
    DAGSTER_HOME (a run worker resolves it in its own environment), and compute logs stay with the events."""
    return {
        "storage": {"postgres": {"postgres_url": {"env": INSTANCE_SECRET}}},
        "local_artifact_storage": {
            "module": "dagster.core.storage.root",
            "class": "LocalArtifactStorage",
            "config": {"base_dir": {"env": "DAGSTER_HOME"}},
        },
        "compute_logs": {"module": "dagster.core.storage.noop_compute_log_manager", "class": "NoOpComputeLogManager"},
        "concurrency": {
            "runs": {"max_concurrent_runs": concurrency},
            "pools": {"default_limit": concurrency},
        },
        "run_launcher": run_launcher or {"module": "readmission_platform.launcher", "class": "LocalRunLauncher"},
        "run_monitoring": {
            "enabled": True,
            "poll_interval_seconds": 5,
            "start_timeout_seconds": 180,
            "cancel_timeout_seconds": 180,
            "free_slots_after_run_end_seconds": 5,
        },
        "run_retries": {"enabled": True, "max_retries": 2, "retry_on_asset_or_op_failure": False},
        "telemetry": {"enabled": False},
    }


def workspace_config(host: str, port: int) -> dict:
    """The workspace of the webserver and the daemon: the code location's gRPC server at `host:port`."""
    return {"load_from": [{"grpc_server": {"host": host, "port": port, "location_name": CODE_LOCATION}}]}
