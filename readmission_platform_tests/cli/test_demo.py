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


def test_rollout_traffic_is_distinct_encounters_of_the_first_batch_from_patients_no_version_trains_on(tmp_path, full_source_bytes):
    from datetime import UTC, datetime

    import polars as pl

    from readmission_platform.cli.demo import rollout_traffic
    from readmission_platform.lib import schema
    from readmission_platform.lib.cleaning import clean
    from readmission_platform.lib.ingest import parse_batch
    from readmission_platform.lib.landing import split_batches
    from readmission_platform.lib.pipeline import CLEAN, NOTHING_LOADED
    from readmission_platform.lib.splitting import SPLIT, assign_split
    from readmission_platform.lib.warehouse import open_warehouse
    from readmission_platform.settings import Settings

    settings = Settings.from_env({"READMISSION_HOME": str(tmp_path)})
    assert rollout_traffic(settings) == []  # nothing stored yet
    frames = {}
    with open_warehouse(settings.warehouse_url) as store:
        for batch_id, content in zip(("batch_0002", "batch_0001"), split_batches(full_source_bytes, batch_size=3_000), strict=False):
            parsed = parse_batch(content, batch_id=batch_id, source_file=f"{batch_id}.csv", loaded_elsewhere=NOTHING_LOADED, now=datetime.now(UTC))
            frames[batch_id] = assign_split(clean(parsed.rows).frame)
            store.replace_batch({CLEAN: (schema.CLEAN_SCHEMA, frames[batch_id])}, batch_id)

    traffic = rollout_traffic(settings, rows=300)
    first = frames["batch_0001"].sort("encounter_id")
    unseen = first.filter(pl.col(SPLIT) == "test")
    assert 300 < first.filter(pl.col(SPLIT) == "test").height < first.height / 2  # what is left out is most of it
    # The first batch's test-side encounters, in encounter order: as many as asked for, none twice, no identifier.
    expected = unseen.head(300)
    assert len(traffic) == 300 and [t["age"] for t in traffic] == expected["age"].to_list()
    assert [t["num_medications"] for t in traffic] == expected["num_medications"].to_list()
    assert not {"encounter_id", "patient_nbr", "readmitted"} & set(traffic[0])
