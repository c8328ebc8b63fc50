"""The demo's progress lines, its choice of a port for the service and the patient key it keeps for its home."""

from __future__ import annotations

import socket

from readmission_platform.cli.demo import Progress, demo_patient_key, port_is_free


def test_progress_names_the_elapsed_time_the_stage_and_the_batches_landed():
    lines, now = [], [100.0]
    progress = Progress(7, lines.append, clock=lambda: now[0])
    progress("started the Dagster daemon")
    now[0], progress.stage, progress.landed = 163.4, "first model", 1
    progress("landed batch_0001.csv (15,000 encounters)")

    assert lines == [
        "[   0 s] start       batch 0/7  started the Dagster daemon",
        "[  63 s] first model batch 1/7  landed batch_0001.csv (15,000 encounters)",
    ]


def test_a_port_something_listens_on_is_not_free():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert not port_is_free(port)
    assert port_is_free(port)


def test_the_demo_makes_a_patient_key_once_for_its_home_readable_by_its_owner_only(tmp_path):
    home = tmp_path / "home"
    key, path = demo_patient_key(home)
    again, _ = demo_patient_key(home)
    other, _ = demo_patient_key(tmp_path / "other")

    assert path == home / "patient.key" and (path.stat().st_mode & 0o777) == 0o600
    assert again == key and len(bytes.fromhex(key)) == 32  # read again, not made anew: stored history stays valid
    assert other != key
