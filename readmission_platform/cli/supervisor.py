"""Keep the platform's long-running Dagster processes (daemon, webserver) up: a process that dies is started again."""

from __future__ import annotations

import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path

FIRST_DELAY_SECONDS = 1.0
LONGEST_DELAY_SECONDS = 60.0
# A process that lived this long is taken to have started well: the next restart waits the first delay again.
STEADY_SECONDS = 30.0


class Supervised:
    """Runs `command` with its output appended to `log_path`; whenever it exits before `stop`, starts it again.

    Each restart is written to the log and told to `say`. A process that keeps dying at once is restarted after
    a delay doubling from one second up to a minute, so a broken configuration does not spin. Processes that stop
    together share `stopping`: once it is set, none is started again.
    """

    def __init__(
        self,
        name: str,
        command: Sequence[str],
        log_path: Path,
        say: Callable[[str], None],
        cwd: Path,
        stopping: threading.Event | None = None,
    ):
        self.name, self.command, self.log_path, self.say, self.cwd = name, list(command), log_path, say, cwd
        self.restarts = 0
        self.process: subprocess.Popen | None = None
        self._stopping = stopping or threading.Event()
        self._watcher = threading.Thread(target=self._watch, name=f"supervise-{name}", daemon=True)

    def __enter__(self) -> Supervised:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._start()
        self._watcher.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._stopping.set()
        self._watcher.join()
        process = self.process
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    def _start(self) -> None:
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(self.command, cwd=self.cwd, stdout=log, stderr=subprocess.STDOUT)
        self._started = time.monotonic()

    def _note(self, message: str) -> None:
        stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S +0000")
        with open(self.log_path, "a") as log:
            log.write(f"{stamp} - readmission supervisor - {message}\n")
        self.say(message)

    def _watch(self) -> None:
        delay = FIRST_DELAY_SECONDS
        while not self._stopping.wait(0.5):
            code = self.process.poll()
            if code is None or self._stopping.is_set():
                continue
            lived = time.monotonic() - self._started
            delay = FIRST_DELAY_SECONDS if lived > STEADY_SECONDS else min(delay * 2, LONGEST_DELAY_SECONDS)
            self._note(f"{self.name} (pid {self.process.pid}) exited with code {code} after {lived:.0f} s; "
                       f"starting it again in {delay:.0f} s")  # fmt: skip
            if self._stopping.wait(delay):
                return
            self._start()
            self.restarts += 1
            self._note(f"{self.name} started again (pid {self.process.pid}, restart {self.restarts})")
