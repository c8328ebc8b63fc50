"""Start the app with `streamlit run`: for `readmission app`, the browser test and the README's screenshots."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

from readmission_platform.serving.server import free_port, stop, wait_until_answering

ENTRY = Path(__file__).with_name("main.py")


def app_command(port: int) -> list[str]:
    """`streamlit run` of the app on 127.0.0.1:`port`, headless, telling Streamlit's makers nothing, without the
    developer's menu (deploy, rerun)."""
    executable = str(Path(sys.executable).with_name("streamlit"))
    return [executable, "run", str(ENTRY), "--server.address", "127.0.0.1", "--server.port", str(port),
            "--server.headless", "true", "--browser.gatherUsageStats", "false", "--client.toolbarMode", "viewer"]  # fmt: skip


@contextmanager
def running_app(env: Mapping[str, str], log_path: Path, *, port: int | None = None, ready_within: float = 60.0) -> Iterator[str]:
    """The app in the background, with `env` added to this process's environment, until the block ends; yields its
    URL once Streamlit's health check answers."""
    port = port or free_port()
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "wb") as output:
        process = subprocess.Popen(app_command(port), env={**os.environ, **env}, stdout=output,
                                   stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
        try:
            url = f"http://127.0.0.1:{port}"
            wait_until_answering(process, f"{url}/_stcore/health", "streamlit run", ready_within, log_path)
            yield url
        finally:
            stop(process)
