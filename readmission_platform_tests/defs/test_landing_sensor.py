"""landing_sensor on a real instance: one partition and one run per new file content, never two."""

from __future__ import annotations

import json
import logging
import time

import dagster as dg
import pytest

from readmission_platform.defs.ingestion.sensors import RETRY_GRACE_SECONDS, crashes_left_unretried, landing_sensor, new_files
from readmission_platform.defs.partitions import batches
from readmission_platform.defs.resources import LandingResource


@pytest.fixture
def landing(tmp_path):
    folder = tmp_path / "landing"
    folder.mkdir()
    return folder


def tick(instance, landing, cursor=None) -> dg.SensorResult:
    """Evaluate the sensor once and apply its partition requests, as the daemon does."""
    context = dg.build_sensor_context(
        instance=instance, cursor=cursor, resources={"landing": LandingResource(folder=str(landing))}
    )
    result = landing_sensor(context)
    for request in result.dynamic_partitions_requests or []:
        instance.add_dynamic_partitions(request.partitions_def_name, list(request.partition_keys))
    return result


def keys(result: dg.SensorResult) -> list[str]:
    return [r.partition_key for r in result.run_requests]


def test_each_new_file_becomes_a_partition_and_a_run_in_the_same_tick(instance, landing, sample_batches):
    assert keys(tick(instance, landing)) == []
    (landing / "batch_0001.csv").write_bytes(sample_batches[0])
    (landing / "batch_0002.csv").write_bytes(sample_batches[1])

    result = tick(instance, landing)

    assert keys(result) == ["batch_0001", "batch_0002"]
    assert instance.get_dynamic_partitions(batches.name) == ["batch_0001", "batch_0002"]
    assert len({r.run_key for r in result.run_requests}) == 2
    assert result.run_requests[0].tags["readmission/source_file"] == "batch_0001.csv"
    assert set(json.loads(result.cursor)) == {"batch_0001.csv", "batch_0002.csv"}


def test_the_same_file_never_yields_a_second_partition_or_run(instance, landing, sample_batches):
    path = landing / "batch_0001.csv"
    path.write_bytes(sample_batches[0])
    first = tick(instance, landing)

    again = tick(instance, landing, first.cursor)
    path.touch()  # a new mtime but the same bytes: reread, recognised, not rerun
    touched = tick(instance, landing, again.cursor)

    assert keys(again) == [] and keys(touched) == []
    assert instance.get_dynamic_partitions(batches.name) == ["batch_0001"]


def test_a_changed_file_is_ingested_again_under_a_fresh_run_key(instance, landing, sample_batches):
    path = landing / "batch_0001.csv"
    path.write_bytes(sample_batches[0])
    first = tick(instance, landing)
    path.write_bytes(sample_batches[0].replace(b"Caucasian", b"Hispanic", 1))

    second = tick(instance, landing, first.cursor)

    assert keys(second) == ["batch_0001"]
    assert second.run_requests[0].run_key != first.run_requests[0].run_key
    assert instance.get_dynamic_partitions(batches.name) == ["batch_0001"]


def test_a_content_that_comes_back_after_a_change_is_ingested_again(instance, landing, sample_batches):
    path = landing / "batch_0001.csv"
    path.write_bytes(sample_batches[0])
    first = tick(instance, landing)
    path.write_bytes(sample_batches[0].replace(b"Caucasian", b"Hispanic", 1))
    corrected = tick(instance, landing, first.cursor)
    path.write_bytes(sample_batches[0])  # the correction withdrawn: the warehouse holds the corrected rows

    restored = tick(instance, landing, corrected.cursor)
    again = tick(instance, landing, corrected.cursor)  # the same tick evaluated again, as after a crash before its cursor

    assert keys(restored) == ["batch_0001"]
    run_keys = [r.run_requests[0].run_key for r in (first, corrected, restored)]
    assert len(set(run_keys)) == 3  # Dagster runs a run key once
    assert again.run_requests[0].run_key == restored.run_requests[0].run_key


def test_a_copy_of_a_landed_file_under_another_name_is_skipped(instance, landing, sample_batches):
    (landing / "batch_0001.csv").write_bytes(sample_batches[0])
    first = tick(instance, landing)
    (landing / "batch_0001 (copy).csv").write_bytes(sample_batches[0])

    second = tick(instance, landing, first.cursor)

    assert keys(second) == []
    assert instance.get_dynamic_partitions(batches.name) == ["batch_0001"]


def test_two_files_of_one_batch_id_are_not_run_until_one_is_renamed(instance, landing, sample_batches, caplog):
    (landing / "batch 1.csv").write_bytes(sample_batches[0])
    (landing / "batch_1.csv").write_bytes(sample_batches[1])

    first = tick(instance, landing)
    again = tick(instance, landing, first.cursor)

    assert keys(first) == keys(again) == []
    assert instance.get_dynamic_partitions(batches.name) == []
    assert new_files(landing, {}, logging.getLogger("test")) == []
    assert caplog.messages == [
        f"{name} skipped: the files 'batch 1.csv', 'batch_1.csv' all make the batch id 'batch_1', so none of them is loaded; "
        "rename all but one (a name of letters, digits, '_', '.' and '-' alone is its own batch id)"
        for name in ("batch 1.csv", "batch_1.csv")
    ]
    (landing / "batch_1.csv").rename(landing / "batch_2.csv")
    renamed = tick(instance, landing, again.cursor)
    assert [(r.partition_key, r.tags["readmission/source_file"]) for r in renamed.run_requests] == [
        ("batch_1", "batch 1.csv"),
        ("batch_2", "batch_2.csv"),
    ]


def test_a_file_landing_beside_an_ingested_one_of_its_batch_id_is_not_run(instance, landing, sample_batches):
    (landing / "batch 1.csv").write_bytes(sample_batches[0])
    first = tick(instance, landing)
    (landing / "batch_1.csv").write_bytes(sample_batches[1])

    second = tick(instance, landing, first.cursor)
    (landing / "batch_1.csv").rename(landing / "batch_2.csv")
    renamed = tick(instance, landing, second.cursor)

    assert keys(first) == ["batch_1"]
    assert keys(second) == []
    assert keys(renamed) == ["batch_2"]


def test_a_change_made_while_its_batch_id_is_shared_is_ingested_once_it_is_not(instance, landing, sample_batches):
    path = landing / "batch 1.csv"
    path.write_bytes(sample_batches[0])
    first = tick(instance, landing)
    (landing / "batch_1.csv").write_bytes(sample_batches[1])
    path.write_bytes(sample_batches[2])

    shared = tick(instance, landing, first.cursor)
    (landing / "batch_1.csv").unlink()
    alone = tick(instance, landing, shared.cursor)

    assert keys(shared) == []
    assert [(r.partition_key, r.tags["readmission/source_file"]) for r in alone.run_requests] == [("batch_1", "batch 1.csv")]
    assert alone.run_requests[0].run_key not in {r.run_key for r in first.run_requests}


def test_files_being_written_are_ignored_and_odd_names_become_valid_keys(instance, landing, sample_batches):
    (landing / ".batch_0003.csv.partial").write_bytes(sample_batches[0][:500])
    (landing / "export 2026,11,21.csv").write_bytes(sample_batches[1])
    (landing / "notes.txt").write_text("not a batch")

    result = tick(instance, landing)

    assert keys(result) == ["export_2026_11_21"]


@pytest.fixture
def retrying_instance():
    with dg.instance_for_test(overrides={"run_retries": {"enabled": True, "max_retries": 2}}) as instance:
        yield instance


def failed_run(instance, result: dg.SensorResult, reason: str, **tags: str) -> dg.DagsterRun:
    """A failed run of the ingestion a tick requested, as the daemon leaves it after giving up on retrying it."""
    request = result.run_requests[0]
    run = dg.DagsterRun(
        job_name="ingest_batch",
        status=dg.DagsterRunStatus.FAILURE,
        tags={**request.tags, "dagster/partition": request.partition_key, "dagster/failure_reason": reason,
              "dagster/will_retry": "false", **tags},
    )  # fmt: skip
    return instance.add_run(run)


def test_a_crash_the_retry_daemon_gave_up_on_is_run_again_while_retries_last(retrying_instance, landing, sample_batches):
    (landing / "batch_0001.csv").write_bytes(sample_batches[0])
    first = tick(retrying_instance, landing)
    crashed = failed_run(retrying_instance, first, "UNEXPECTED_TERMINATION")

    again = tick(retrying_instance, landing, first.cursor)

    assert keys(again) == ["batch_0001"]
    assert again.run_requests[0].run_key.endswith(crashed.run_id)
    assert again.run_requests[0].tags["readmission/after_crash_of"] == crashed.run_id
    failed_run(retrying_instance, again, "UNEXPECTED_TERMINATION")
    assert keys(tick(retrying_instance, landing, first.cursor)) == ["batch_0001"]
    failed_run(retrying_instance, again, "UNEXPECTED_TERMINATION")  # three attempts: the two retries are spent
    assert keys(tick(retrying_instance, landing, first.cursor)) == []


def test_only_runs_of_the_same_content_count_against_its_crash_retries(retrying_instance, landing, sample_batches):
    path = landing / "batch_0001.csv"
    cursor = None
    for content in (sample_batches[0], sample_batches[1]):  # two earlier contents, each ingested
        path.write_bytes(content)
        landed = tick(retrying_instance, landing, cursor)
        cursor = landed.cursor
        retrying_instance.add_run(dg.DagsterRun(job_name="ingest_batch", status=dg.DagsterRunStatus.SUCCESS,
                                                tags={**landed.run_requests[0].tags, "dagster/partition": "batch_0001"}))  # fmt: skip
    path.write_bytes(sample_batches[0].replace(b"Caucasian", b"Hispanic", 1))
    third = tick(retrying_instance, landing, cursor)
    crashed = failed_run(retrying_instance, third, "UNEXPECTED_TERMINATION")

    again = tick(retrying_instance, landing, third.cursor)

    assert keys(again) == ["batch_0001"] and again.run_requests[0].run_key.endswith(crashed.run_id)


def test_a_bad_file_a_retried_crash_and_a_changed_file_are_not_run_again(retrying_instance, landing, sample_batches):
    (landing / "batch_0001.csv").write_bytes(sample_batches[0])
    first = tick(retrying_instance, landing)
    bad = failed_run(retrying_instance, first, "STEP_FAILURE")
    assert keys(tick(retrying_instance, landing, first.cursor)) == []

    retrying_instance.delete_run(bad.run_id)
    failed_run(retrying_instance, first, "UNEXPECTED_TERMINATION", **{"dagster/auto_retry_run_id": "retry"})
    assert keys(tick(retrying_instance, landing, first.cursor)) == []

    (landing / "batch_0001.csv").write_bytes(sample_batches[1])
    changed = tick(retrying_instance, landing, first.cursor)
    assert [r.run_key.count(":") for r in changed.run_requests] == [2]  # the new content's own run, nothing else


def test_a_crash_the_retry_daemon_said_it_would_retry_but_did_not_is_run_again_after_a_grace(
    retrying_instance, landing, sample_batches
):
    (landing / "batch_0001.csv").write_bytes(sample_batches[0])
    first = tick(retrying_instance, landing)
    crashed = failed_run(retrying_instance, first, "UNEXPECTED_TERMINATION", **{"dagster/will_retry": "true"})
    seen = json.loads(first.cursor)

    waiting = crashes_left_unretried(retrying_instance, seen)
    late = crashes_left_unretried(retrying_instance, seen, now=time.time() + RETRY_GRACE_SECONDS + 1)

    assert waiting == []  # the retry daemon's turn
    assert [r.partition_key for r in late] == ["batch_0001"] and late[0].run_key.endswith(crashed.run_id)
