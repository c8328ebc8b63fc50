"""The `readmission` command: land batches, run the demo, open the UI, report what the platform holds."""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Callable

from readmission_platform.lib.reporting import masked
from readmission_platform.lib.warehouse import WarehouseError
from readmission_platform.settings import (
    ALERTMANAGER_PORT,
    APP_PORT,
    DAGSTER_UI_PORT,
    MLFLOW_UI_PORT,
    PIPELINE_METRICS_PORT,
    PROMETHEUS_PORT,
    SERVICE_PORT,
    AppSettings,
    ServingSettings,
    Settings,
    keep_private,
    parse_number,
)


def _say(message: str) -> None:
    print(message, flush=True)


def land(settings: Settings, count: int | None, every: float | None) -> int:
    from readmission_platform.lib.landing import land as land_batches
    from readmission_platform.lib.source import bundled_source, read_source_bytes

    source = read_source_bytes(settings.source)
    while True:
        landed = land_batches(source, settings.landing_dir, 1 if every else count, source=f"source {settings.source or bundled_source()}")
        for batch in landed:
            _say(f"landed {batch.path} ({batch.rows:,} encounters)")
        if not landed:
            _say(f"every batch of the source is already in {settings.landing_dir}")
            return 0
        if not every:
            return 0
        time.sleep(every)


DEMO_ROLLOUT = {"READMISSION_ROLLOUT_STEPS": "50,100", "READMISSION_ROLLOUT_STAGE_SECONDS": "5",
                "READMISSION_ROLLOUT_MIN_REQUESTS": "200"}  # fmt: skip


def demo(settings: Settings, timeout: float, port: int) -> int:
    import dagster as dg

    from readmission_platform.cli.demo import Progress, demo_patient_key, port_is_free, run_demo, running_daemon
    from readmission_platform.cli.instance import prepare_dagster_home
    from readmission_platform.lib.landing import landed_files, split_batches
    from readmission_platform.lib.source import read_source_bytes
    from readmission_platform.serving.server import free_port

    progress = Progress(0, _say)
    prepare_dagster_home(settings)
    # A promoted challenger rolls out (shadow, then canary) before it serves everyone; in the demo each stage lasts
    # seconds, not hours (unless the variables are set), so the newcomer watches it reach production.
    for name, value in DEMO_ROLLOUT.items():
        os.environ.setdefault(name, value)
    # Patient history needs a key to hash identifiers with; the demo's processes (daemon, code server, service) share
    # the one it keeps for the home unless one is given.
    key_note = "READMISSION_PATIENT_KEY: given"
    if not settings.patient_key:
        key, key_path = demo_patient_key(settings.home)
        os.environ["READMISSION_PATIENT_KEY"] = key
        settings = dataclasses.replace(settings, patient_key=key)
        key_note = (f"READMISSION_PATIENT_KEY: not set, so the demo hashes patient identifiers with the key it keeps in "
                    f"{key_path} (export READMISSION_PATIENT_KEY=\"$(cat {key_path})\" to give `readmission ui` and "
                    f"`serve` the same)")  # fmt: skip
    _say(
        f"READMISSION_HOME={settings.home}\nwarehouse: {masked(settings.warehouse_url)}\n"
        f"Dagster storage: {masked(settings.dagster_storage_url or 'SQLite in ' + str(settings.dagster_home))}\n"
        f"MLflow: {masked(settings.mlflow_tracking_uri)}\n{key_note}"
    )
    source = read_source_bytes(settings.source)
    progress.batches, progress.landed = len(split_batches(source)), len(landed_files(settings.landing_dir))
    if not port:
        port = free_port()
    elif not port_is_free(port):
        _say(f"port {port} is taken (another `readmission serve`?): the demo's service takes a free one instead")
        port = free_port()
    _say(
        "\nbatches land one at a time; landing_sensor ingests each (raw_batches → clean_batches → features → "
        "batch_drift) and retrain_sensor retrains on all batches so far (training_set → trained_model → "
        "promotion_decision → serving_bento), one retrain at a time: batches that land during a retrain share the "
        "next one. The service answers from the first promotion on and follows each later one without a restart.\n"
    )
    log_path = settings.home / "logs" / "dagster-daemon.log"
    with dg.DagsterInstance.get() as instance, running_daemon(instance, log_path, progress):
        served = run_demo(settings, source, instance, progress, timeout, port, log_path)
    progress.stage = "summary"
    ok = summarize(settings) and served
    progress(f"done in {progress.elapsed:.0f} s")
    _say(next_steps())
    return 0 if ok else 1


def next_steps() -> str:
    """Where to look next: what the demo leaves behind can be opened, each on its own port, all at once."""
    rows = [
        ("the service (the Bento the last retrain built)", "make serve", SERVICE_PORT),
        ("the clinician's app (asks that service)", "make app", APP_PORT),
        ("the Dagster UI: every run, partition and check", "make ui", DAGSTER_UI_PORT),
        ("the MLflow UI: every candidate and version", "make mlflow-ui", MLFLOW_UI_PORT),
    ]
    return "\nopen next (each on its own port, all at once):\n" + "\n".join(
        f"  {what:<48} {command:<15} http://127.0.0.1:{port}" for what, command, port in rows
    )


def summarize(settings: Settings) -> bool:
    """Print what the instance, the warehouse and the registry hold; False if the newest run of a batch or of a file
    of outcomes failed."""
    import dagster as dg

    from readmission_platform.cli.report import (
        latest_batch_reports,
        latest_outcome_reports,
        render,
        render_live,
        render_models,
        render_not_ingested,
        render_outcome_files,
        render_serving_drift,
    )
    from readmission_platform.lib.landing import batch_id_for, landed_files

    with dg.DagsterInstance.get() as instance:
        reports = latest_batch_reports(instance)
        outcome_files = latest_outcome_reports(instance)
        drift = render_serving_drift(instance)
    _say("\n" + render(reports))
    ingested = {r.batch_id for r in reports}
    if waiting := dict.fromkeys(b for p in landed_files(settings.landing_dir) if (b := batch_id_for(p)) not in ingested):
        _say(render_not_ingested(list(waiting)))
    _say("\n" + render_models(settings))
    _say("\n" + render_outcome_files(outcome_files))
    _say("\n" + render_live(settings))
    _say("\n" + drift)
    return all(r.status == "success" for r in [*reports, *outcome_files])


def status(settings: Settings) -> int:
    from readmission_platform.cli.instance import prepare_dagster_home

    prepare_dagster_home(settings)
    return 0 if summarize(settings) else 1


def outcomes(settings: Settings) -> int:
    from readmission_platform.cli.demo import land_served_outcomes

    land_served_outcomes(settings, _say)
    return 0


def rollback(settings: Settings, reason: str) -> int:
    from datetime import UTC, datetime

    import polars as pl

    from readmission_platform.lib.promotion import DECISION_SCHEMA, DECISIONS, record_decisions, rollback_row
    from readmission_platform.lib.registry import ModelRegistry
    from readmission_platform.lib.warehouse import open_warehouse

    registry = ModelRegistry(settings.mlflow_tracking_uri, settings.mlflow_artifact_location)
    warehouse = open_warehouse(settings.warehouse_url)
    # The warehouse is reached (its decisions table widened if an earlier version made it) before production moves:
    # one that is down or locked leaves production where it was, not moved with no decision recorded.
    warehouse.add_columns(DECISIONS, DECISION_SCHEMA)
    replaced, restored = registry.rollback(reason=reason)
    row = rollback_row(replaced=replaced, restored=restored, reason=reason, now=datetime.now(UTC))
    try:
        record_decisions(warehouse, pl.DataFrame([row], schema=DECISION_SCHEMA))
    except Exception as error:
        raise RuntimeError(
            f"production moved back from v{replaced} to v{restored}, but the decision was not recorded in "
            f"{DECISIONS}: {error}; the versions' MLflow tags record the rollback and its reason"
        ) from error
    _say(f"production moved back from v{replaced} to v{restored}: {reason}")
    return 0


# How often `readmission ui`, when another command's daemon serves the instance, checks that it still does.
DAEMON_CHECK_SECONDS = 10


def ui(settings: Settings, port: int) -> int:
    """The Dagster UI on `port`, and a daemon unless another (the demo's, say) already heartbeats on the instance, in
    which case one is started once that one stops; until Ctrl-C or SIGTERM."""
    import contextlib

    import dagster as dg

    from readmission_platform.cli.demo import daemon_is_alive, port_is_free, running_daemon
    from readmission_platform.cli.instance import REPO_ROOT, prepare_dagster_home
    from readmission_platform.cli.supervisor import Supervised

    prepare_dagster_home(settings)
    if not port_is_free(port):
        raise OSError(f"port {port} is taken (another `readmission ui`?): open http://127.0.0.1:{port} if it is one, "
                      "or give another port with --port")  # fmt: skip
    logs = settings.home / "logs"
    daemon_log = logs / "dagster-daemon.log"
    webserver = [os.path.join(os.path.dirname(sys.executable), "dagster-webserver"), "-w", str(REPO_ROOT / "workspace.yaml"),
                 "-h", "127.0.0.1", "-p", str(port)]  # fmt: skip
    # The webserver and the daemon apart (not `dagster dev`, which ends both when one dies), each started again if it
    # dies. One daemon per instance: another command's daemon is used while it runs.
    stopping = threading.Event()
    handlers = {stop: signal.getsignal(stop) for stop in (signal.SIGINT, signal.SIGTERM)}
    try:
        with (
            dg.DagsterInstance.get() as instance,
            contextlib.ExitStack() as daemons,
            Supervised("dagster-webserver", webserver, logs / "dagster-webserver.log", _say, REPO_ROOT, stopping),
        ):
            # Ctrl-C reaches both processes too: from then on neither is started again.
            for stop in handlers:
                signal.signal(stop, lambda *_: stopping.set())
            daemon = daemons.enter_context(running_daemon(instance, daemon_log, _say, stopping))
            if daemon is not None:
                _say(f"Dagster UI on http://127.0.0.1:{port}, daemon running; logs in {logs}. Ctrl-C stops both.")
            else:
                _say(f"Dagster UI on http://127.0.0.1:{port}, on the daemon already running (one starts here if it "
                     f"stops); logs in {logs}. Ctrl-C stops what this command started.")  # fmt: skip
            while not stopping.wait(DAEMON_CHECK_SECONDS):
                if daemon is None and not daemon_is_alive(instance):
                    _say("the other Dagster daemon on this instance has stopped")
                    daemon = daemons.enter_context(running_daemon(instance, daemon_log, _say, stopping))
    finally:
        for stop, handler in handlers.items():
            signal.signal(stop, handler)
    return 0


def mlflow_ui(settings: Settings, port: int) -> int:
    executable = os.path.join(os.path.dirname(sys.executable), "mlflow")
    arguments = ["ui", "--backend-store-uri", settings.mlflow_tracking_uri, "--host", "127.0.0.1", "--port", str(port)]
    os.execv(executable, [executable, *arguments])


def serve(settings: Settings, source: bool, bento: str, port: int, workers: int | None) -> int:
    from readmission_platform.serving.server import serve_command

    ServingSettings.from_env()  # a variable the workers could not start with is named here, not in their traceback
    name = bento.split(":")[0]
    if not source and not (settings.bentoml_home / "bentos" / name).is_dir():
        raise ValueError(
            f"no Bento '{name}' in {settings.bentoml_home}: run `make demo`, or materialize serving_bento in the UI, "
            "or serve the repository's service with --source"
        )
    command, env, folder = serve_command(settings, bento=None if source else bento, port=port, workers=workers)
    _say(f"{' '.join(command[1:])}  (READMISSION_HOME={settings.home}, BENTOML_HOME={env['BENTOML_HOME']})")
    os.chdir(folder)
    os.execve(command[0], command, env)


def app(settings: Settings, port: int, service: str | None) -> int:
    from readmission_platform.app.server import app_command

    env = {**os.environ, "READMISSION_HOME": str(settings.home)}
    if service:
        env["READMISSION_SERVICE_URL"] = service
    command = app_command(port)
    _say(f"the app on http://127.0.0.1:{port}, asking the service at {AppSettings.from_env(env).service_url}")
    os.execve(command[0], command, env)


# Commands a person waits on at the prompt, which talk to MLflow and start no process that does; and how MLflow's client
# retries for them (MLFLOW_HTTP_REQUEST_* variables).
ANSWER_SOON = frozenset({"status", "rollback", "rollout", "outcomes"})
# Commands that open the Dagster instance.
OPEN_THE_INSTANCE = frozenset({"demo", "status", "ui", "observe"})
ANSWER_SOON_MLFLOW = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                      "MLFLOW_HTTP_REQUEST_TIMEOUT": "20"}  # fmt: skip


def _argument(kind: type, low: float, high: float) -> Callable[[str], int | float]:
    """An argparse type: `kind` of the text within [low, high], by the rule the settings' variables follow."""

    def parse(text: str) -> int | float:
        try:
            return parse_number(text, kind, (low, high))
        except ValueError as error:
            raise argparse.ArgumentTypeError(f"{text!r}: {error}") from None

    return parse


PORT, ANY_PORT, WORKERS = _argument(int, 1, 65_535), _argument(int, 0, 65_535), _argument(int, 1, 256)
COUNT = _argument(int, 1, math.inf)
SECONDS = _argument(float, 0.001, 7 * 24 * 3600)  # a week at most


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="readmission", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    land_parser = commands.add_parser("land", help="drop the next batch files into the landing folder")
    how_many = land_parser.add_mutually_exclusive_group(required=True)
    how_many.add_argument("--count", type=COUNT, metavar="N", help="land the next N batches")
    how_many.add_argument("--all", action="store_true", help="land every batch that has not landed yet")
    how_many.add_argument("--every", type=SECONDS, metavar="SECONDS", help="land one batch per interval until all landed")
    demo_parser = commands.add_parser("demo", help="land the batches one at a time; the sensors ingest and retrain, headless")
    demo_parser.add_argument("--timeout", type=SECONDS, default=900, help="seconds to wait for one run (default 900)")
    demo_parser.add_argument("--port", type=ANY_PORT, default=SERVICE_PORT,
                             help=f"the service's port while the demo runs (default {SERVICE_PORT}; 0 or taken: a free one)")
    commands.add_parser("status", help="rows, rejections, drops and checks of every batch; models, decisions, live performance")
    commands.add_parser("outcomes", help="land the outcomes of the served encounters, from the data set's labels")
    rollback_parser = commands.add_parser("rollback", help="move the registry alias `production` back to the previous version")
    rollback_parser.add_argument("--reason", required=True, help="why; recorded on both versions and in promotion_decisions")
    rollout_parser = commands.add_parser("rollout", help="the candidate in shadow or canary: its stage and signals, or a step by hand")
    rollout_parser.add_argument("action", choices=["status", "advance", "abort"], help="show it, move it a stage on, or take it out")
    rollout_parser.add_argument("--reason", help="why (advance, abort); recorded on the version and in promotion_decisions")
    ui_parser = commands.add_parser("ui", help="open the Dagster UI and daemon on the platform's instance")
    ui_parser.add_argument("--port", type=PORT, default=DAGSTER_UI_PORT)
    mlflow_parser = commands.add_parser("mlflow-ui", help="open the MLflow UI on the platform's tracking store")
    mlflow_parser.add_argument("--port", type=PORT, default=MLFLOW_UI_PORT)
    serve_parser = commands.add_parser("serve", help="serve the production model over HTTP with bentoml serve")
    serve_parser.add_argument("--port", type=PORT, default=SERVICE_PORT)
    serve_parser.add_argument("--workers", type=WORKERS, help="worker processes (default 1)")
    which = serve_parser.add_mutually_exclusive_group()
    which.add_argument("--bento", default="readmission:latest", help="the Bento to serve (default readmission:latest)")
    which.add_argument("--source", action="store_true", help="serve the repository's service (bentoml serve .)")
    observe_parser = commands.add_parser("observe", help="start Prometheus and Alertmanager on the platform's state")
    observe_parser.add_argument("--service", action="append", metavar="HOST:PORT",
                                help=f"a `readmission serve` to scrape (repeatable; default 127.0.0.1:{SERVICE_PORT})")
    observe_parser.add_argument("--webhook", default="http://127.0.0.1:9095/alerts",
                                help="where Alertmanager sends every alert (default http://127.0.0.1:9095/alerts)")
    observe_parser.add_argument("--prometheus-port", type=PORT, default=PROMETHEUS_PORT)
    observe_parser.add_argument("--alertmanager-port", type=PORT, default=ALERTMANAGER_PORT)
    observe_parser.add_argument("--pipeline-port", type=PORT, default=PIPELINE_METRICS_PORT,
                                help=f"the pipeline's metrics (default {PIPELINE_METRICS_PORT})")
    app_parser = commands.add_parser("app", help="open the clinician's app (Streamlit) on the prediction service")
    app_parser.add_argument("--port", type=PORT, default=APP_PORT)
    app_parser.add_argument("--service", metavar="URL",
                            help=f"the service's base URL (default READMISSION_SERVICE_URL, else http://127.0.0.1:{SERVICE_PORT})")
    args = parser.parse_args(argv)

    settings = Settings.from_env()
    if args.command in ANSWER_SOON:
        # MLflow retries a request seven times over about two minutes by default: right for the pipeline's runs, not
        # for a person at the prompt whose tracking server is down. Their own setting, if any, stands.
        for name, value in ANSWER_SOON_MLFLOW.items():
            os.environ.setdefault(name, value)
    try:
        keep_private(settings.home)
        from readmission_platform.cli.instance import check_dagster_storage, check_database

        if args.command in OPEN_THE_INSTANCE:
            check_dagster_storage(settings)
        if args.command in ANSWER_SOON | {"demo"}:  # MLflow retries a database store that is down for a minute
            variable = settings.variables.get("mlflow_tracking_uri", "READMISSION_MLFLOW_TRACKING_URI")
            check_database(settings.mlflow_tracking_uri, variable)
        if args.command == "land":
            return land(settings, None if args.all else args.count, args.every)
        if args.command == "demo":
            return demo(settings, args.timeout, args.port)
        if args.command == "status":
            return status(settings)
        if args.command == "outcomes":
            return outcomes(settings)
        if args.command == "rollback":
            return rollback(settings, args.reason)
        if args.command == "rollout":
            from readmission_platform.cli.rollout import rollout

            return rollout(settings, args.action, args.reason, _say)
        if args.command == "serve":
            return serve(settings, args.source, args.bento, args.port, args.workers)
        if args.command == "observe":
            from readmission_platform.cli.observe import Ports, observe

            ports = Ports(args.prometheus_port, args.alertmanager_port, args.pipeline_port)
            return observe(settings, _say, service=args.service or [f"127.0.0.1:{SERVICE_PORT}"], webhook=args.webhook, ports=ports)
        if args.command == "app":
            return app(settings, args.port, args.service)
        if args.command == "mlflow-ui":
            return mlflow_ui(settings, args.port)
        return ui(settings, args.port)
    except (OSError, ValueError, TimeoutError, RuntimeError, WarehouseError) as error:
        print(f"readmission {args.command}: {error}", file=sys.stderr)
        return 2
    except Exception as error:
        # Imported here: MLflow takes seconds to import, and `land` should not wait for it.
        from mlflow.exceptions import MlflowException

        from readmission_platform.lib.registry import RegistryError

        if isinstance(error, MlflowException):  # the tracking store did not answer, or refused
            first = next(iter(str(error.message).splitlines()), "")
            print(f"readmission {args.command}: MLflow at {masked(settings.mlflow_tracking_uri)}: {first}", file=sys.stderr)
            return 2
        if not isinstance(error, RegistryError):
            raise
        print(f"readmission {args.command}: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
