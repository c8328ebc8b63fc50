"""The supervisor of the platform's long-running processes, on real processes killed with SIGKILL."""

from __future__ import annotations

import os
import signal
import sys
import time

from readmission_platform.cli.supervisor import Supervised

SLEEPER = [sys.executable, "-c", "import time; print('up', flush=True); time.sleep(600)"]


def wait_for(condition, seconds: float = 20):
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"not true after {seconds} s"
        time.sleep(0.1)


def test_a_killed_process_is_started_again_and_the_restart_is_logged(tmp_path):
    said: list[str] = []
    log = tmp_path / "logs" / "sleeper.log"

    with Supervised("sleeper", SLEEPER, log, said.append, tmp_path) as sleeper:
        wait_for(lambda: log.read_text().count("up\n") == 1)
        first = sleeper.pid
        os.kill(first, signal.SIGKILL)
        wait_for(lambda: log.read_text().count("up\n") == 2)
        second = sleeper.process
        assert second.pid != first and second.poll() is None

    assert second.poll() is not None  # stopped with the block, not started again
    text = log.read_text()
    assert f"sleeper (pid {first}) exited with code -9" in text
    assert f"sleeper started again (pid {second.pid}, restart 1)" in text
    assert said == [line.split(" - readmission supervisor - ")[1] for line in text.splitlines() if "supervisor" in line]
