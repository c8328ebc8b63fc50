"""raw_batches → clean_batches → features with their checks, materialized on a real DuckDB file and PostgreSQL."""

from __future__ import annotations

import dagster as dg
import polars as pl
import pytest

from readmission_platform.defs.ingestion.assets import BatchTablesConfig, batch_tables
from readmission_platform.defs.partitions import batches
from readmission_platform.lib import schema
from readmission_platform.lib.features import FEATURE_SCHEMA

TABLES = ("raw_batches", "rejected_rows", "clean_batches", "features")
TIMESTAMPS = {"raw_batches": "ingested_at", "rejected_rows": "rejected_at"}


def run_batch(platform, instance, batch_id: str, selection=None):
    instance.add_dynamic_partitions(batches.name, [batch_id])
    return dg.materialize(
        [batch_tables],
        selection=selection,
        partition_key=batch_id,
        resources=platform.resources,
        instance=instance,
        raise_on_error=False,
    )


def check_results(result) -> dict[str, dg.AssetCheckEvaluation]:
    return {e.check_name: e for e in result.get_asset_check_evaluations()}


def snapshot(platform) -> dict[str, pl.DataFrame]:
    """Every table, sorted, without the wall-clock columns that record when a write happened."""
    store = platform.warehouse
    tables = {}
    for table in TABLES:
        if table in store.tables():
            frame = store.read_table(table).drop(TIMESTAMPS.get(table, []), strict=False)
            tables[table] = frame.sort(frame.columns)
    return tables


def failure_message(result) -> str:
    failures = [e for e in result.all_events if e.event_type_value == "STEP_FAILURE"]
    assert failures, "expected a failed step"
    data = failures[0].step_failure_data
    return data.user_failure_data.description if data.user_failure_data else data.error.message


def test_a_batch_flows_through_every_asset_and_check(platform, instance, sample_batches):
    platform.drop("batch_0001.csv", sample_batches[0])
    result = run_batch(platform, instance, "batch_0001")

    assert result.success
    checks = check_results(result)
    assert set(checks) == {key.name for key in batch_tables.check_keys}
    assert all(e.passed for e in checks.values()), {n: e.description for n, e in checks.items() if not e.passed}
    store = platform.warehouse
    raw, clean, feats = (store.read_table(t, "batch_0001") for t in ("raw_batches", "clean_batches", "features"))
    assert raw.height == 1_000
    assert 0 < clean.height < raw.height  # the sample holds deaths and hospice discharges
    assert feats.height == clean.height
    assert raw["source_file"].unique().to_list() == ["batch_0001.csv"]
    assert raw["line_number"].sort().to_list() == list(range(2, 1_002))
    (dropped,) = [e.materialization.metadata for e in result.get_asset_materialization_events() if e.asset_key.path == ["clean_batches"]]
    assert dropped["dropped_death_or_hospice"].value + dropped["dropped_invalid_gender"].value == raw.height - clean.height


def test_materializing_a_batch_twice_leaves_the_same_tables(platform, instance, sample_batches):
    platform.drop("batch_0001.csv", sample_batches[0])
    platform.drop("batch_0002.csv", sample_batches[1][:-200])  # a truncated last line gives a rejected row
    for batch_id in ("batch_0001", "batch_0002"):
        assert run_batch(platform, instance, batch_id).success
    first = snapshot(platform)
    assert first["rejected_rows"].height == 1

    assert run_batch(platform, instance, "batch_0002").success
    second = snapshot(platform)
    assert first.keys() == second.keys()
    for table in first:
        assert first[table].equals(second[table]), table


def test_a_wrong_header_fails_the_batch_names_the_columns_and_writes_nothing(platform, instance, sample_batches):
    platform.drop("batch_0001.csv", sample_batches[0])
    assert run_batch(platform, instance, "batch_0001").success
    before = snapshot(platform)

    header, body = sample_batches[1].split(b"\r\n", 1)
    bad_header = header.replace(b"A1Cresult", b"a1c_result").replace(b",readmitted", b",readmitted,comment")
    platform.drop("batch_0002.csv", bad_header + b"\r\n" + body)
    result = run_batch(platform, instance, "batch_0002")

    assert not result.success
    message = failure_message(result)
    assert "batch_0002" in message and "nothing was written" in message
    assert "missing ['A1Cresult']" in message and "'a1c_result'" in message and "'comment'" in message
    assert snapshot(platform).keys() == before.keys()
    for table, frame in snapshot(platform).items():
        assert frame.equals(before[table]), table


@pytest.mark.parametrize(
    ("content", "expected"),
    [(b"", "is empty"), (b"encounter_id," + ",".join(schema.RAW_COLUMNS[1:]).encode() + b"\r\n", "no encounters")],
    ids=["empty file", "header only"],
)
def test_a_file_without_encounters_fails_and_damages_nothing(platform, instance, sample_batches, content, expected):
    platform.drop("batch_0001.csv", sample_batches[0])
    assert run_batch(platform, instance, "batch_0001").success
    before = snapshot(platform)

    platform.drop("batch_0002.csv", content)
    result = run_batch(platform, instance, "batch_0002")

    assert not result.success
    assert expected in failure_message(result)
    for table, frame in snapshot(platform).items():
        assert frame.equals(before[table]), table


def test_bad_rows_are_rejected_with_reasons_and_the_rest_loads(platform, instance, sample_batches):
    platform.drop("batch_0001.csv", sample_batches[0])
    assert run_batch(platform, instance, "batch_0001").success
    lines = sample_batches[1].split(b"\r\n")
    header, body = lines[0], [line for line in lines[1:] if line]
    repeated = sample_batches[0].split(b"\r\n")[1:11]  # ten encounters batch_0001 already holds
    short = [line.rsplit(b",", 3)[0] for line in body[:5]]  # cut-off rows
    bad_id = [b"abc" + body[5][body[5].index(b",") :]]
    content = b"\r\n".join([header, *body[6:], *repeated, *short, *bad_id]) + b"\r\n"
    platform.drop("batch_0002.csv", content)

    result = run_batch(platform, instance, "batch_0002")

    assert result.success  # rejecting rows is not failing the batch
    rejected = platform.warehouse.read_table("rejected_rows", "batch_0002")
    reasons = rejected["reason"].to_list()
    assert sum("already loaded in batch batch_0001" in r for r in reasons) == 10
    assert sum("has 47 fields; expected 50" in r for r in reasons) == 5
    assert sum("encounter_id 'abc' is not a positive integer" in r for r in reasons) == 1
    assert platform.warehouse.read_table("raw_batches", "batch_0002").height == len(body) - 6
    share = check_results(result)["check_raw_batches_rejected_share"]
    assert not share.passed and share.severity == dg.AssetCheckSeverity.WARN  # 16 of 1,010 rows > 1 %
    assert "16 of 1010 rows rejected" in share.description
    assert check_results(result)["check_raw_batches_unique_encounter_id"].passed


def test_a_value_outside_the_schema_fails_the_blocking_check_and_stops_features(platform, instance, sample_batches):
    content = sample_batches[0].replace(b",[70-80),", b",[100-110),", 1)
    platform.drop("batch_0001.csv", content)

    result = run_batch(platform, instance, "batch_0001")

    assert not result.success
    values = check_results(result)["check_clean_batches_values"]
    assert not values.passed and values.severity == dg.AssetCheckSeverity.ERROR
    assert "column 'age' holds '[100-110)' in 1 rows" in values.description
    assert "expected one of [0-10)" in values.description
    materialized = {e.asset_key.path[-1] for e in result.get_asset_materialization_events()}
    assert materialized == {"raw_batches", "clean_batches"}  # the failed check's own asset is kept, for a look
    assert "check_features_spec" not in check_results(result)
    assert platform.warehouse.read_table("clean_batches", "batch_0001").height > 0
    assert platform.warehouse.query("SELECT * FROM features WHERE batch_id = 'batch_0001'").height == 0


def test_a_batch_whose_rows_are_all_rejected_stops_at_raw_batches(platform, instance, sample_batches):
    lines = sample_batches[0].split(b"\r\n")
    platform.drop("batch_0001.csv", b"\r\n".join([lines[0], *(line[:40] for line in lines[1:] if line)]) + b"\r\n")

    result = run_batch(platform, instance, "batch_0001")

    assert not result.success
    columns = check_results(result)["check_raw_batches_columns"]
    assert not columns.passed
    assert "batch batch_0001 has no rows in raw_batches: every one of its 1000 rows was rejected" in columns.description
    assert {e.asset_key.path[-1] for e in result.get_asset_materialization_events()} == {"raw_batches"}
    assert platform.warehouse.read_table("rejected_rows", "batch_0001").height == 1_000
    assert "clean_batches" not in platform.warehouse.tables()


def test_one_asset_alone_reads_its_input_from_the_warehouse(platform, instance, sample_batches):
    platform.drop("batch_0001.csv", sample_batches[0])
    assert run_batch(platform, instance, "batch_0001").success
    before = snapshot(platform)
    platform.warehouse.replace_batch({"features": (FEATURE_SCHEMA, pl.DataFrame(schema=FEATURE_SCHEMA))}, "batch_0001")

    result = run_batch(platform, instance, "batch_0001", selection=["features"])

    assert result.success
    assert {e.asset_key.path[-1] for e in result.get_asset_materialization_events()} == {"features"}
    assert set(check_results(result)) == {"check_features_spec"}
    after = snapshot(platform)
    for table in TABLES:
        assert after[table].equals(before[table]), table


def test_batch_tables_called_directly_loads_the_partition(platform, instance, sample_batches):
    platform.drop("batch_0003.csv", sample_batches[2])
    instance.add_dynamic_partitions(batches.name, ["batch_0003"])
    context = dg.build_asset_context(partition_key="batch_0003", instance=instance)

    results = list(batch_tables(context, config=BatchTablesConfig(), **platform.resources))

    materialized = {r.asset_key.path[-1]: r.metadata for r in results if isinstance(r, dg.MaterializeResult)}
    assert materialized["raw_batches"]["dagster/row_count"] == 1_000
    assert materialized["raw_batches"]["rejected_rows"] == 0
    assert materialized["features"]["dagster/row_count"] == materialized["clean_batches"]["dagster/row_count"]
    assert all(r.passed for r in results if isinstance(r, dg.AssetCheckResult))
    assert platform.warehouse.read_table("raw_batches", "batch_0003").height == 1_000


def test_a_batch_whose_file_vanished_fails_with_the_folder_named(platform, instance):
    result = run_batch(platform, instance, "batch_0009")
    assert not result.success
    assert f"no file for batch 'batch_0009' in {platform.landing}" in failure_message(result)


def test_a_batch_id_two_files_make_fails_naming_both_and_keeps_what_is_stored(platform, instance, sample_batches):
    platform.drop("batch 1.csv", sample_batches[0])
    assert run_batch(platform, instance, "batch_1").success
    before = snapshot(platform)
    platform.drop("batch_1.csv", sample_batches[1])

    result = run_batch(platform, instance, "batch_1")

    assert not result.success
    assert failure_message(result).startswith(
        "batch batch_1 was not loaded, nothing was written: the files 'batch 1.csv', 'batch_1.csv' all make the batch id 'batch_1'"
    )
    after = snapshot(platform)
    for table in TABLES:
        assert after[table].equals(before[table]), table


def test_a_check_selected_alone_is_evaluated_again_on_the_stored_rows(platform, instance, sample_batches):
    platform.drop("batch_0001.csv", sample_batches[0])
    assert run_batch(platform, instance, "batch_0001").success
    store = platform.warehouse
    clean = store.read_table("clean_batches", "batch_0001")
    first_age = pl.when(pl.int_range(pl.len()) == 0).then(pl.lit("[100-110)")).otherwise(pl.col("age")).alias("age")
    store.replace_batch({"clean_batches": (schema.CLEAN_SCHEMA, clean.with_columns(first_age))}, "batch_0001")
    before = snapshot(platform)
    check = dg.AssetCheckKey(dg.AssetKey("clean_batches"), "check_clean_batches_values")

    # As the UI launches a check of a partition alone: a run of that check tagged with the partition, no asset.
    result = dg.materialize(
        [batch_tables],
        selection=dg.AssetSelection.checks(check),
        tags={"dagster/partition": "batch_0001"},
        resources=platform.resources,
        instance=instance,
        raise_on_error=False,
    )

    assert set(check_results(result)) == {"check_clean_batches_values"}
    values = check_results(result)["check_clean_batches_values"]
    assert not values.passed and "column 'age' holds '[100-110)' in 1 rows" in values.description
    assert not result.get_asset_materialization_events()
    after = snapshot(platform)
    for table in TABLES:
        assert after[table].equals(before[table]), table
