"""Prometheus and Alertmanager started on a folder of the platform's state, for `readmission observe` and the tests."""

from __future__ import annotations

import contextlib
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

from readmission_platform.ops import generate
from readmission_platform.serving.server import stop, wait_until_answering

# Debian's package names Alertmanager's binary prometheus-alertmanager; upstream's tarball names it alertmanager.
BINARIES = {"prometheus": ("prometheus",), "alertmanager": ("prometheus-alertmanager", "alertmanager")}


def binary(server: str) -> str:
    """The path of `server`'s executable; a RuntimeError saying how to install it otherwise."""
    for name in BINARIES[server]:
        if path := shutil.which(name):
            return path
    raise RuntimeError(
        f"{' or '.join(BINARIES[server])} is not on PATH; install it: apt-get install prometheus prometheus-alertmanager"
    )


def write_config(
    folder: Path, *, service: list[str], pipeline: list[str], alertmanager: str, prometheus: str, webhook: str,
    interval: str = "15s", group_wait: str = "30s", hold: str | None = None,
) -> tuple[Path, Path]:  # fmt: skip
    """Prometheus' configuration with the rules, and Alertmanager's, written into `folder` for these addresses
    (`interval`, `group_wait` and `hold`, every alert's `for`, shortened only by the tests)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "rules.yml").write_text(generate.to_yaml(generate.rules(hold=hold)))
    prometheus_file, alertmanager_file = folder / "prometheus.yml", folder / "alertmanager.yml"
    prometheus_file.write_text(
        generate.to_yaml(
            generate.prometheus_config(service=service, pipeline=pipeline, alertmanager=alertmanager,
                                       prometheus=prometheus, rule_files=[str(folder / "rules.yml")], interval=interval)
        )  # fmt: skip
    )
    alertmanager_file.write_text(generate.to_yaml(generate.alertmanager_config(webhook=webhook, group_wait=group_wait)))
    return prometheus_file, alertmanager_file


def prometheus_command(config: Path, storage: Path, address: str) -> list[str]:
    return [binary("prometheus"), f"--config.file={config}", f"--storage.tsdb.path={storage}",
            f"--web.listen-address={address}"]  # fmt: skip


def alertmanager_command(config: Path, storage: Path, address: str) -> list[str]:
    # An empty cluster address: a single Alertmanager, which does not take the gossip port 9094.
    return [binary("alertmanager"), f"--config.file={config}", f"--storage.path={storage}",
            f"--web.listen-address={address}", "--cluster.listen-address="]  # fmt: skip


@contextlib.contextmanager
def running(command: list[str], address: str, log_path: Path, ready_within: float = 60.0) -> Iterator[str]:
    """`command` in the background until the block ends; yields its base URL once /-/ready answers 200."""
    url = f"http://{address}"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as output:
        process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            wait_until_answering(process, f"{url}/-/ready", Path(command[0]).name, ready_within, log_path)
            yield url
        finally:
            stop(process, timeout=20)
