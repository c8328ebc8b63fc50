"""process_batch: the three stages of a batch in one pass, on a real DuckDB file and PostgreSQL."""

import multiprocessing
import traceback
from datetime import UTC, datetime

import pytest

from readmission_platform.lib.landing import split_batches
from readmission_platform.lib.pipeline import CLEAN, FEATURES, RAW, STAGES, process_batch
from readmission_platform.lib.warehouse import open_warehouse

NOW = datetime(2024, 6, 1, 9, tzinfo=UTC)


@pytest.fixture(params=["duckdb", pytest.param("postgres", marks=pytest.mark.postgres)])
def warehouse_url(request, tmp_path) -> str:
    if request.param == "duckdb":
        return f"duckdb:///{tmp_path / 'warehouse.duckdb'}"
    return request.getfixturevalue("pg_schema_url")


@pytest.fixture(scope="module")
def files(sample_source_bytes) -> list[bytes]:
    return split_batches(sample_source_bytes, 500)


def counts(url: str) -> dict[str, int]:
    store = open_warehouse(url)
    return {t: store.read_table(t).height for t in ("raw_batches", "rejected_rows", "clean_batches", "features") if t in store.tables()}


def test_one_pass_writes_every_stage_and_reports_what_it_computed(warehouse_url, files):
    run = process_batch(open_warehouse(warehouse_url), "b1", content=files[0], source_file="b1.csv", now=NOW)

    assert run.written == list(STAGES)
    assert run.parsed.rows.height == 500 and run.cleaned.frame.height == run.features.height < 500
    assert counts(warehouse_url) == {"raw_batches": 500, "rejected_rows": 0, "clean_batches": run.features.height, "features": run.features.height}


def test_a_gate_that_says_stop_keeps_the_stages_after_it_unwritten(warehouse_url, files):
    seen = []

    def gate(stage, run):
        seen.append(stage)
        return stage != CLEAN

    run = process_batch(open_warehouse(warehouse_url), "b1", content=files[0], source_file="b1.csv", now=NOW, gate=gate)

    assert seen == [RAW, CLEAN] and run.written == [RAW, CLEAN]
    assert set(counts(warehouse_url)) == {"raw_batches", "rejected_rows", "clean_batches"}


def test_a_failure_during_the_pass_writes_nothing(warehouse_url, files):
    store = open_warehouse(warehouse_url)
    process_batch(store, "b1", content=files[0], source_file="b1.csv", now=NOW)
    before = {t: store.read_table(t).sort("encounter_id") for t in ("raw_batches", "clean_batches", "features")}

    def gate(stage, run):
        if stage == CLEAN:
            raise RuntimeError("the check itself broke")
        return True

    with pytest.raises(RuntimeError, match="the check itself broke"):
        process_batch(store, "b1", content=files[1], source_file="b1.csv", now=NOW, gate=gate)

    for table, frame in before.items():
        assert store.read_table(table).sort("encounter_id").equals(frame), table


def test_a_later_stage_alone_reads_its_input_from_the_warehouse(warehouse_url, files):
    store = open_warehouse(warehouse_url)
    first = process_batch(store, "b1", content=files[0], source_file="b1.csv", now=NOW)

    again = process_batch(store, "b1", stages=[FEATURES])

    assert again.written == [FEATURES] and again.parsed is None and again.cleaned is None
    assert again.features.equals(first.features)


def test_unknown_stages_and_a_raw_stage_without_its_file_are_refused(warehouse_url):
    store = open_warehouse(warehouse_url)
    with pytest.raises(ValueError, match=r"unknown stages \['scores'\]"):
        process_batch(store, "b1", stages=["scores"])
    with pytest.raises(ValueError, match="raw_batches needs the batch file's content"):
        process_batch(store, "b1")


def _ingest(url: str, batch_id: str, content: bytes, start, outcome) -> None:
    try:
        store = open_warehouse(url)
        start.wait(timeout=120)
        run = process_batch(store, batch_id, content=content, source_file=f"{batch_id}.csv", now=NOW)
        outcome.put((batch_id, run.parsed.rejected["reason"].to_list()))
    except BaseException:
        outcome.put((batch_id, traceback.format_exc()))


def test_two_writers_ingesting_at_once_never_store_an_id_twice(warehouse_url, files):
    # Each batch also holds 20 encounters of the other: whichever is judged second rejects those 40.
    header, *first = files[0].split(b"\r\n")
    _, *second = files[1].split(b"\r\n")
    first, second = [line for line in first if line], [line for line in second if line]
    contents = {
        "x": b"\r\n".join([header, *first, *second[:20]]) + b"\r\n",
        "y": b"\r\n".join([header, *second, *first[:20]]) + b"\r\n",
    }
    context = multiprocessing.get_context("spawn")
    start, outcome = context.Barrier(2), context.Queue()
    writers = [context.Process(target=_ingest, args=(warehouse_url, b, c, start, outcome)) for b, c in contents.items()]
    for writer in writers:
        writer.start()
    results = dict(outcome.get(timeout=180) for _ in writers)
    for writer in writers:
        writer.join(timeout=60)

    assert all(isinstance(reasons, list) for reasons in results.values()), results
    rejected = {b: reasons for b, reasons in results.items() if reasons}
    assert len(rejected) == 1, results  # the second writer saw the first one's rows
    reasons, winner = next(iter(rejected.values())), ({"x", "y"} - set(rejected)).pop()
    assert len(reasons) == 40 and all(f"was already loaded in batch {winner}" in r for r in reasons)
    stored = open_warehouse(warehouse_url).read_table("raw_batches")
    assert stored.height == 1_000 and stored["encounter_id"].n_unique() == stored.height


@pytest.mark.postgres
def test_a_pass_that_loses_a_race_for_its_ids_reads_again_and_rejects_them(pg_schema_url, files):
    store = open_warehouse(pg_schema_url)
    process_batch(store, "b0", content=files[2], source_file="b0.csv", now=NOW)  # the table exists
    header, *lines = files[0].split(b"\r\n")
    rival = b"\r\n".join([header, *lines[:10]]) + b"\r\n"
    passes = []

    def gate(stage, run):
        if stage == RAW:
            passes.append(run.loaded_elsewhere["batch_id"].unique().sort().to_list())
            if len(passes) == 1:  # while b1 is staged, another writer stores ten of its encounters
                process_batch(store, "rival", content=rival, source_file="rival.csv", now=NOW)
        return True

    run = process_batch(store, "b1", content=files[0], source_file="b1.csv", now=NOW, gate=gate)

    assert passes == [["b0"], ["b0", "rival"]]
    assert run.parsed.rejected.height == 10
    assert all("was already loaded in batch rival" in reason for reason in run.parsed.rejected["reason"])
    stored = store.read_table("raw_batches")
    assert stored.height == 500 + 10 + 490 and stored["encounter_id"].n_unique() == stored.height
