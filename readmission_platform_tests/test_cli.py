"""The `readmission` command as a person runs it: landing batches and the headless demo."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

DEMO_ROWS = 30_500  # three batches: 15,000 + 15,000 + 500


def readmission(*args: str, home: Path, source: Path | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("READMISSION_", "DAGSTER_"))}
    env["READMISSION_HOME"] = str(home)
    if source is not None:
        env["READMISSION_SOURCE"] = str(source)
    command = [str(Path(sys.executable).with_name("readmission")), *args]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def demo_source(tmp_path_factory, full_source_bytes) -> Path:
    path = tmp_path_factory.mktemp("source") / "export.csv"
    path.write_bytes(b"".join(full_source_bytes.splitlines(keepends=True)[: DEMO_ROWS + 1]))
    return path


def test_land_drops_the_next_batches_then_the_rest(tmp_path, demo_source):
    first = readmission("land", "--count", "2", home=tmp_path, source=demo_source)
    rest = readmission("land", "--all", home=tmp_path, source=demo_source)
    nothing_left = readmission("land", "--count", "1", home=tmp_path, source=demo_source)

    assert first.returncode == 0, first.stderr
    assert sorted(p.name for p in (tmp_path / "landing").iterdir()) == [
        "batch_0001.csv",
        "batch_0002.csv",
        "batch_0003.csv",
    ]
    assert "batch_0003.csv (500 encounters)" in rest.stdout
    assert "already in" in nothing_left.stdout
    assert (tmp_path / "landing" / "batch_0001.csv").read_bytes().count(b"\r\n") == 15_001


def test_land_refuses_a_source_of_another_schema_and_lands_nothing(tmp_path):
    source = tmp_path / "other.csv"
    source.write_text("id,name\n1,x\n")

    result = readmission("land", "--all", home=tmp_path, source=source)

    assert result.returncode == 2
    assert "missing ['encounter_id'" in result.stderr and "unexpected ['id', 'name']" in result.stderr
    assert not list((tmp_path / "landing").glob("*.csv"))


def test_land_rejects_a_count_below_one(tmp_path):
    result = readmission("land", "--count", "0", home=tmp_path)
    assert result.returncode == 2 and "at least 1" in result.stderr


def test_demo_runs_every_batch_through_the_sensor_headless_and_summarises(tmp_path, demo_source):
    result = readmission("demo", home=tmp_path, source=demo_source, timeout=600)

    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    for batch in ("batch_0001", "batch_0002", "batch_0003"):
        assert f"{batch}   run" in out  # progress lines while it runs
    summary = out[out.index("batch          status") :]
    assert "total                    30,500" in summary
    assert "every check passed on every batch" in summary
    assert "make ui" in out

    again = readmission("status", home=tmp_path)
    assert again.returncode == 0
    assert summary.splitlines()[2] in again.stdout  # the same rows, read back from the instance
