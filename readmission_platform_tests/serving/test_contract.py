"""Schemathesis over every route of the served /docs.json, with all its checks: the document is the contract."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from readmission_platform_tests.serving.conftest import TOKEN

EXAMPLES = 150  # per operation and phase: some thousands of requests in all
SEED = 20_261_201


def test_every_answer_of_every_route_is_the_documented_one(gated_server, tmp_path):
    command = [
        str(Path(sys.executable).with_name("st")), "run", f"{gated_server.url}/docs.json", "--checks", "all",
        "--header", f"Authorization: Bearer {TOKEN}", "--seed", str(SEED), "--max-examples", str(EXAMPLES),
        "--workers", "1", "--no-color", "--report", "junit", "--report-dir", str(tmp_path),
    ]  # fmt: skip
    run = subprocess.run(command, capture_output=True, text=True, timeout=1_800, cwd=tmp_path)
    summary = run.stdout[run.stdout.rfind("SUMMARY") :]
    print(summary)
    assert run.returncode == 0, run.stdout[-20_000:]
    generated = int(re.search(r"(\d+) generated", summary)[1])
    assert generated >= 2_000 and "Tested: 8" in summary, summary
