"""The `readmission` command: land batches, run the demo, open the UI, report what the platform holds."""

from __future__ import annotations

import argparse
import os
import sys
import time

from readmission_platform.settings import Settings


def _say(message: str) -> None:
    print(message, flush=True)


def land(settings: Settings, count: int | None, every: float | None) -> int:
    from readmission_platform.lib.landing import land as land_batches
    from readmission_platform.lib.source import read_source_bytes

    source = read_source_bytes(settings.source)
    while True:
        landed = land_batches(source, settings.landing_dir, 1 if every else count)
        for batch in landed:
            _say(f"landed {batch.path} ({batch.rows:,} encounters)")
        if not landed:
            _say(f"every batch of the source is already in {settings.landing_dir}")
            return 0
        if not every:
            return 0
        time.sleep(every)


def demo(settings: Settings, timeout: float) -> int:
    import dagster as dg

    from readmission_platform.demo import running_daemon, wait_for_batches
    from readmission_platform.instance import prepare_dagster_home
    from readmission_platform.report import latest_batch_reports, render

    started = time.monotonic()
    prepare_dagster_home(settings)
    _say(f"READMISSION_HOME={settings.home}\nwarehouse: {settings.warehouse_url}")
    land(settings, count=None, every=None)
    log_path = settings.home / "logs" / "dagster-daemon.log"
    with dg.DagsterInstance.get() as instance:
        with running_daemon(instance, log_path, _say):
            _say("landing_sensor turns each file into a partition and runs raw_batches → clean_batches → features:")
            wait_for_batches(instance, settings.landing_dir, _say, timeout, log_path)
        reports = latest_batch_reports(instance)
    _say("\n" + render(reports))
    _say(f"\ndone in {time.monotonic() - started:.0f} s. Open the Dagster UI on this instance with `make ui`.")
    return 0 if all(r.status == "success" for r in reports) else 1


def status(settings: Settings) -> int:
    import dagster as dg

    from readmission_platform.instance import prepare_dagster_home
    from readmission_platform.report import latest_batch_reports, render

    prepare_dagster_home(settings)
    with dg.DagsterInstance.get() as instance:
        _say(render(latest_batch_reports(instance)))
    return 0


def ui(settings: Settings, port: int) -> int:
    from readmission_platform.instance import REPO_ROOT, prepare_dagster_home

    prepare_dagster_home(settings)
    executable = os.path.join(os.path.dirname(sys.executable), "dagster")
    workspace = str(REPO_ROOT / "workspace.yaml")
    os.execv(executable, [executable, "dev", "-w", workspace, "-h", "127.0.0.1", "-p", str(port)])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="readmission", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    land_parser = commands.add_parser("land", help="drop the next batch files into the landing folder")
    how_many = land_parser.add_mutually_exclusive_group(required=True)
    how_many.add_argument("--count", type=int, metavar="N", help="land the next N batches")
    how_many.add_argument("--all", action="store_true", help="land every batch that has not landed yet")
    how_many.add_argument("--every", type=float, metavar="SECONDS", help="land one batch per interval until all landed")
    demo_parser = commands.add_parser("demo", help="land every batch and process them through the sensors, headless")
    demo_parser.add_argument("--timeout", type=float, default=900, help="seconds to wait for the runs (default 900)")
    commands.add_parser("status", help="rows, rejections, drops and check results of every batch")
    ui_parser = commands.add_parser("ui", help="open the Dagster UI and daemon on the platform's instance")
    ui_parser.add_argument("--port", type=int, default=3000)
    args = parser.parse_args(argv)

    settings = Settings.from_env()
    try:
        if args.command == "land":
            if args.count is not None and args.count < 1:
                parser.error("--count takes a number of batches of at least 1")
            return land(settings, None if args.all else args.count, args.every)
        if args.command == "demo":
            return demo(settings, args.timeout)
        if args.command == "status":
            return status(settings)
        return ui(settings, args.port)
    except (OSError, ValueError, TimeoutError) as error:
        print(f"readmission {args.command}: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
