"""The environment, read once at the edge: `Settings` for the definitions, the CLI and the service; `ServingSettings`
for the knobs of a serving worker."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

# What the platform creates holds patient identifiers and clinical values: its user's alone (files 0600, folders 0700).
PRIVATE_UMASK = 0o077

# Default ports on 127.0.0.1, distinct so that everything the platform starts can run at once.
DAGSTER_UI_PORT = 3000
SERVICE_PORT = 3100
APP_PORT = 8501
MLFLOW_UI_PORT = 5000
PROMETHEUS_PORT = 9090
ALERTMANAGER_PORT = 9093
PIPELINE_METRICS_PORT = 9464


@dataclass(frozen=True)
class Settings:
    home: Path
    warehouse_url: str
    source: Path | None
    dagster_storage_url: str | None
    mlflow_tracking_uri: str
    prediction_log_url: str
    alertmanager_url: str | None = None  # where the pipeline's sensors post alerts; None: they log and skip
    # The landing area, the one folder the production profile shares by design; None: `home / "landing"`.
    landing: Path | None = None
    # The key of the hash standing for a patient identifier (history lookups); None: requests' identifiers are not used.
    patient_key: str | None = field(default=None, repr=False)
    # Setting → the variable whose text it is; settings left to their defaults are not in it.
    variables: Mapping[str, str] = field(default_factory=dict, compare=False)

    @property
    def landing_dir(self) -> Path:
        return self.landing or self.home / "landing"

    @property
    def dagster_home(self) -> Path:
        return self.home / "dagster"

    @property
    def mlflow_dir(self) -> Path:
        return self.home / "mlflow"

    @property
    def mlflow_artifact_root(self) -> Path:
        return self.mlflow_dir / "artifacts"

    @property
    def mlflow_artifact_location(self) -> str | None:
        """Where a new experiment keeps its artifacts: the home's folder for a store on a database; None for a tracking
        server (http), which proxies artifacts to its own `--artifacts-destination`, so clients need no shared disk."""
        if self.mlflow_tracking_uri.startswith(("http://", "https://")):
            return None
        return self.mlflow_artifact_root.as_uri()

    @property
    def bentoml_home(self) -> Path:
        """BentoML's model and Bento stores (BENTOML_HOME for every bentoml command the platform runs)."""
        return self.home / "bentoml"

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> Settings:
        """READMISSION_HOME (default ./.readmission), READMISSION_WAREHOUSE_URL (default its DuckDB file),
        READMISSION_SOURCE (default the bundled data set), READMISSION_DAGSTER_STORAGE_URL (default SQLite),
        READMISSION_MLFLOW_TRACKING_URI or else MLFLOW_TRACKING_URI (default SQLite under the home),
        READMISSION_PREDICTION_LOG_URL (default SQLite under the home), READMISSION_ALERTMANAGER_URL (default unset),
        READMISSION_LANDING_DIR (default the home's landing/),
        READMISSION_PATIENT_KEY (default unset: no patient history at serving)."""
        home = Path(env.get("READMISSION_HOME") or ".readmission").expanduser().resolve()
        source = env.get("READMISSION_SOURCE")
        landing = env.get("READMISSION_LANDING_DIR")
        variables: dict[str, str] = {}

        def given(setting: str, *names: str) -> str | None:
            """The first of the variables `names` that is set, noted as the one behind `setting`."""
            for name in names:
                if env.get(name):
                    variables[setting] = name
                    return env[name]
            return None

        return cls(
            home=home,
            warehouse_url=given("warehouse_url", "READMISSION_WAREHOUSE_URL") or f"duckdb:///{home / 'warehouse.duckdb'}",
            source=Path(source).expanduser().resolve() if source else None,
            dagster_storage_url=given("dagster_storage_url", "READMISSION_DAGSTER_STORAGE_URL"),
            mlflow_tracking_uri=given("mlflow_tracking_uri", "READMISSION_MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_URI")
            or f"sqlite:///{home / 'mlflow' / 'mlflow.db'}",
            prediction_log_url=given("prediction_log_url", "READMISSION_PREDICTION_LOG_URL")
            or f"sqlite:///{home / 'predictions.sqlite'}",
            alertmanager_url=given("alertmanager_url", "READMISSION_ALERTMANAGER_URL"),
            landing=Path(landing).expanduser().resolve() if landing else None,
            patient_key=given("patient_key", "READMISSION_PATIENT_KEY"),
            variables=variables,
        )


def parse_number(text: str, kind: type = int, within: tuple[float, float] | None = None) -> int | float:
    """`text` as a `kind`, within [low, high] if given (NaN never is; `high` may be infinite); a ValueError saying
    what was expected."""
    expected = "a whole number" if kind is int else "a number"
    try:
        value = kind(text)
    except ValueError:
        raise ValueError(f"expected {expected}") from None
    if within is not None and not within[0] <= value <= within[1]:
        low, high = (f"{int(end):,}" if float(end).is_integer() else f"{end:g}" for end in within)
        span = f"of at least {low}" if within[1] == math.inf else f"from {low} to {high}"
        raise ValueError(f"expected {expected} {span}")
    return value


def _number(
    env: Mapping[str, str], name: str, default: int | float, kind: type = int, within: tuple[float, float] | None = None
) -> int | float:
    """The variable `name` as a `kind` (within [low, high] if given), `default` when unset or empty; a ValueError
    naming the variable otherwise."""
    text = env.get(name) or ""
    if not text:
        return default
    try:
        return parse_number(text, kind, within)
    except ValueError as error:
        raise ValueError(f"{name} is {text!r}; {error}") from None


@dataclass(frozen=True)
class ServingSettings:
    """What a serving worker reads besides `Settings`: the token, how often it checks the alias, its threads and log."""

    api_token: str | None = None
    reload_seconds: float = 30.0
    workers: int = 1
    # Native threads per worker (the fast path's batch loop, BLAS): scale with workers instead, as more threads than
    # free cores only contend for them.
    threads: int = 1
    # Predictions a worker keeps waiting for its log writer; past that they are dropped and counted, never waited for.
    log_queue_rows: int = 100_000
    # The log writer process's niceness (see `PredictionLog`); 0 leaves it alone.
    log_writer_nice: int = -5
    fast_path: bool = True
    max_body_bytes: int | None = None  # None: a full batch at its largest (`encounter.MAX_BATCH_BYTES`)
    # How long a candidate (shadow or canary) may take for one encounter, and per 1,000 of a batch, before production
    # answers in its place.
    candidate_timeout_ms: float = 200.0

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> ServingSettings:
        """READMISSION_API_TOKEN (unset: open), READMISSION_RELOAD_SECONDS (30), READMISSION_SERVE_WORKERS (1),
        READMISSION_SERVE_THREADS (1), READMISSION_PREDICTION_LOG_QUEUE_ROWS (100,000), READMISSION_PREDICTION_LOG_NICE
        (-5), READMISSION_FAST_PATH (`0` switches it off), READMISSION_MAX_BODY_BYTES (a full batch at its largest),
        READMISSION_CANDIDATE_TIMEOUT_MS (200)."""
        timeout = _number(env, "READMISSION_CANDIDATE_TIMEOUT_MS", cls.candidate_timeout_ms, float, (0.001, 60_000))
        # Each within what a worker can work with: a reload interval of 0 checks the registry without pause, a queue
        # of no rows drops every prediction, and a body limit below zero refuses every request.
        return cls(
            api_token=env.get("READMISSION_API_TOKEN") or None,
            reload_seconds=_number(env, "READMISSION_RELOAD_SECONDS", cls.reload_seconds, float, (0.1, 86_400)),
            workers=_number(env, "READMISSION_SERVE_WORKERS", cls.workers, int, (1, 256)),
            threads=_number(env, "READMISSION_SERVE_THREADS", cls.threads, int, (1, 256)),
            log_queue_rows=_number(env, "READMISSION_PREDICTION_LOG_QUEUE_ROWS", cls.log_queue_rows, int, (1, 100_000_000)),
            log_writer_nice=_number(env, "READMISSION_PREDICTION_LOG_NICE", cls.log_writer_nice, int, (-20, 19)),
            fast_path=env.get("READMISSION_FAST_PATH", "1") != "0",
            max_body_bytes=_number(env, "READMISSION_MAX_BODY_BYTES", 0, int, (0, 2**31)) or None,
            candidate_timeout_ms=timeout,
        )


@dataclass(frozen=True)
class RolloutSettings:
    """How a promoted challenger is rolled out: the canary's shares of requests, step by step, and the least time and
    requests at each stage (shadow and every step) before it advances."""

    steps: tuple[float, ...] = (0.10, 0.25, 0.50, 0.75, 1.00)
    stage_seconds: float = 3600.0
    min_requests: int = 200

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> RolloutSettings:
        """READMISSION_ROLLOUT_STEPS (percent of requests, comma-separated; 10,25,50,75,100),
        READMISSION_ROLLOUT_STAGE_SECONDS (3600), READMISSION_ROLLOUT_MIN_REQUESTS (200)."""
        text = env.get("READMISSION_ROLLOUT_STEPS") or ""
        steps = cls.steps
        if text:
            try:
                steps = tuple(float(part) / 100 for part in text.split(","))
            except ValueError:
                raise ValueError(f"READMISSION_ROLLOUT_STEPS is {text!r}; expected percentages like 10,25,50,75,100") from None
            if any(not 0 < s <= 1 for s in steps) or list(steps) != sorted(set(steps)):
                raise ValueError(f"READMISSION_ROLLOUT_STEPS is {text!r}; expected rising percentages in (0, 100]")
        return cls(
            steps=steps,
            stage_seconds=_number(env, "READMISSION_ROLLOUT_STAGE_SECONDS", cls.stage_seconds, float),
            min_requests=_number(env, "READMISSION_ROLLOUT_MIN_REQUESTS", cls.min_requests),
        )


@dataclass(frozen=True)
class AppSettings:
    """What the clinician's app reads besides `Settings`: where the service answers, and its token."""

    service_url: str = f"http://127.0.0.1:{SERVICE_PORT}"
    api_token: str | None = None

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> AppSettings:
        """READMISSION_SERVICE_URL (default http://127.0.0.1:3100, `readmission serve`'s), READMISSION_API_TOKEN
        (unset: the service is open)."""
        return cls(
            service_url=(env.get("READMISSION_SERVICE_URL") or cls.service_url).rstrip("/"),
            api_token=env.get("READMISSION_API_TOKEN") or None,
        )


def keep_private(home: Path | None = None) -> None:
    """From now on this process and its children create files 0600 and folders 0700, whatever umask they inherited;
    `home`, if given, is made (or narrowed to) 0700, so that what an older version left there is out of others' reach."""
    os.umask(PRIVATE_UMASK)
    if home is not None:
        home.mkdir(parents=True, exist_ok=True)
        home.chmod(0o700)
