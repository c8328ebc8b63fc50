import multiprocessing
import traceback
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import urlsplit

import polars as pl
import psycopg
import pytest
from polars.testing import assert_frame_equal

from readmission_platform.lib import schema
from readmission_platform.lib.cleaning import clean
from readmission_platform.lib.features import FEATURE_SCHEMA, build_features
from readmission_platform.lib.ingest import parse_batch
from readmission_platform.lib.warehouse import (
    ConflictingWrite,
    DuckDBWarehouse,
    PostgresWarehouse,
    Warehouse,
    WarehouseError,
    open_warehouse,
    partition_prefix,
    table_ddl,
)
from readmission_platform.lib.warehouse.duckdb import ROW_GROUP_SIZE

RAW = "raw_batches"
REJECTED = "rejected_rows"


@pytest.fixture(params=["duckdb", pytest.param("postgres", marks=pytest.mark.postgres)])
def warehouse(request, tmp_path):
    """An empty warehouse: a DuckDB file, or a schema of its own in the session's PostgreSQL database."""
    if request.param == "duckdb":
        yield DuckDBWarehouse(tmp_path / "warehouse.duckdb")
        return
    yield PostgresWarehouse(request.getfixturevalue("pg_schema_url"))


@pytest.fixture(scope="module")
def batches(sample_source_bytes) -> dict[str, tuple[pl.DataFrame, pl.DataFrame]]:
    """Raw and rejected rows of two batches 'a' and 'b' cut from the sample; each has one truncated line."""
    lines = sample_source_bytes.splitlines(keepends=True)
    found = {}
    for batch_id, body in (("a", lines[1:201]), ("b", lines[201:501])):
        body[-1] = body[-1][:60] + b"\r\n"
        parsed = parse_batch(
            lines[0] + b"".join(body),
            batch_id=batch_id,
            source_file=f"{batch_id}.csv",
            loaded_elsewhere=pl.DataFrame(schema={"encounter_id": pl.Int64, schema.BATCH_ID: pl.String}),
            now=datetime(2024, 1, 1, 8, 30, 15, 123456, tzinfo=UTC),
        )
        found[batch_id] = (parsed.rows, parsed.rejected)
    return found


def writes(raw: pl.DataFrame, rejected: pl.DataFrame) -> dict:
    return {RAW: (schema.RAW_SCHEMA, raw), REJECTED: (schema.REJECTED_SCHEMA, rejected)}


def stored(warehouse: Warehouse, table: str, batch_id: str | None = None) -> pl.DataFrame:
    return warehouse.read_table(table, batch_id).sort("batch_id", "line_number")


def test_replace_batch_twice_leaves_the_same_rows(warehouse, batches):
    raw, rejected = batches["a"]
    warehouse.replace_batch(writes(raw, rejected), "a")
    first = (stored(warehouse, RAW), stored(warehouse, REJECTED))
    warehouse.replace_batch(writes(raw, rejected), "a")

    assert_frame_equal(stored(warehouse, RAW), first[0])
    assert_frame_equal(stored(warehouse, REJECTED), first[1])
    assert_frame_equal(first[0], raw)
    assert_frame_equal(first[1], rejected)
    assert (first[0].height, first[1].height) == (199, 1)


def test_replacing_one_batch_leaves_the_others_alone(warehouse, batches):
    for batch_id, (raw, rejected) in batches.items():
        warehouse.replace_batch(writes(raw, rejected), batch_id)
    raw_a, rejected_a = batches["a"]

    warehouse.replace_batch(writes(raw_a.head(10), rejected_a.clear()), "a")

    assert_frame_equal(stored(warehouse, RAW, "a"), raw_a.head(10))
    assert stored(warehouse, REJECTED, "a").is_empty()
    assert_frame_equal(stored(warehouse, RAW, "b"), batches["b"][0])
    assert_frame_equal(stored(warehouse, REJECTED, "b"), batches["b"][1])


def _missing_a_column(frame: pl.DataFrame) -> pl.DataFrame:
    return frame.drop("reason")


def _text_in_a_number_column(frame: pl.DataFrame) -> pl.DataFrame:
    return frame.with_columns(pl.lit("line four").alias("line_number"))


@pytest.mark.parametrize("spoil", [_missing_a_column, _text_in_a_number_column])
def test_failure_in_a_later_table_undoes_the_whole_replacement(warehouse, batches, spoil):
    raw, rejected = batches["a"]
    warehouse.replace_batch(writes(raw, rejected), "a")

    with pytest.raises(Exception):
        warehouse.replace_batch(
            {
                RAW: (schema.RAW_SCHEMA, raw.head(3)),
                "brand_new": (schema.REJECTED_SCHEMA, rejected),
                REJECTED: (schema.REJECTED_SCHEMA, spoil(rejected)),
            },
            "a",
        )

    assert_frame_equal(stored(warehouse, RAW), raw)
    assert_frame_equal(stored(warehouse, REJECTED), rejected)
    assert "brand_new" not in warehouse.tables()


def test_tables_round_trip_the_schema_types(warehouse, batches):
    raw, rejected = batches["b"]
    cleaned = clean(raw).frame
    features = build_features(cleaned)
    tables = {
        RAW: (schema.RAW_SCHEMA, raw),
        REJECTED: (schema.REJECTED_SCHEMA, rejected),
        "clean_batches": (schema.CLEAN_SCHEMA, cleaned),
        "features": (FEATURE_SCHEMA, features),
    }
    warehouse.replace_batch(tables, "b")

    for table, (columns, frame) in tables.items():
        back = warehouse.read_table(table)
        assert back.schema == pl.Schema(columns), table
        assert_frame_equal(back.sort(back.columns[:4]), frame.sort(frame.columns[:4]))
    assert cleaned["race"].null_count() > 0 and features.height == cleaned.height > 290


def test_columns_of_one_value_round_trip_every_type(warehouse):
    # PostgreSQL loads such columns as one value each (`postgres._constants`), not row by row; a NULL or a float is sent.
    columns = {"batch_id": pl.String, "n": pl.Int64, "small": pl.Int16, "flag": pl.Boolean, "x": pl.Float64,
               "at": pl.Datetime("us", "UTC"), "quoted": pl.String, "gap": pl.String}  # fmt: skip
    at = datetime(2026, 12, 5, 1, 2, 3, 456789, tzinfo=UTC)
    rows = pl.DataFrame(
        {"batch_id": ["c"] * 3, "n": [7] * 3, "small": [2] * 3, "flag": [False] * 3, "x": [0.5] * 3, "at": [at] * 3,
         "quoted": ["it's"] * 3, "gap": [None] * 3},
        schema=columns,
    )  # fmt: skip
    warehouse.replace_batch({"constants": (columns, rows)}, "c")
    assert_frame_equal(warehouse.read_table("constants"), rows)


def test_empty_frame_clears_the_batch_and_still_creates_the_table(warehouse, batches):
    raw, rejected = batches["a"]
    warehouse.replace_batch(writes(raw, rejected), "a")
    warehouse.replace_batch(writes(raw.clear(), rejected.clear()), "a")

    assert warehouse.read_table(RAW).is_empty()
    assert list(warehouse.read_table(RAW).schema) == list(schema.RAW_SCHEMA)

    warehouse.replace_batch({"features": (FEATURE_SCHEMA, pl.DataFrame(schema=FEATURE_SCHEMA))}, "a")
    assert warehouse.read_table("features").schema == pl.Schema(FEATURE_SCHEMA)


def test_query_takes_parameters_and_a_missing_table_reads_as_no_rows(warehouse, batches):
    raw, rejected = batches["b"]
    warehouse.replace_batch(writes(raw, rejected), "b")

    counted = warehouse.query(f"SELECT batch_id, COUNT(*) AS n FROM {RAW} WHERE line_number > $1 GROUP BY batch_id", [100])
    assert counted.rows() == [("b", 200)]
    assert warehouse.query("SELECT * FROM never_created").is_empty()
    with pytest.raises(Exception, match="no_such_column"):
        warehouse.query(f"SELECT no_such_column FROM {RAW}")


def test_a_query_of_a_duckdb_file_not_made_yet_reads_no_rows_and_makes_nothing(tmp_path):
    from readmission_platform.lib.warehouse import open_warehouse

    store = open_warehouse(f"duckdb:///{tmp_path / 'not-yet' / 'warehouse.duckdb'}")
    assert store.query("SELECT * FROM promotion_decisions").is_empty()
    assert not (tmp_path / "not-yet").exists()


def test_reading_a_missing_table_names_it(warehouse):
    with pytest.raises(WarehouseError, match="table 'clean_batches' does not exist in .*; materialize its asset first"):
        warehouse.read_table("clean_batches")


def test_tables_and_columns_describe_what_exists(warehouse, batches):
    assert warehouse.tables() == set()
    assert warehouse.columns(RAW) == {}

    warehouse.replace_batch(writes(*batches["a"]), "a")

    assert warehouse.tables() == {RAW, REJECTED}
    columns = warehouse.columns(REJECTED)
    assert list(columns) == list(schema.REJECTED_SCHEMA)
    assert columns["line_number"] == "BIGINT" if isinstance(warehouse, DuckDBWarehouse) else "bigint"


def test_table_with_other_columns_is_refused_naming_them(warehouse, batches):
    legacy = {"batch_id": pl.String(), "legacy_code": pl.Int64()}
    warehouse.replace_batch({RAW: (legacy, pl.DataFrame({"batch_id": ["a"], "legacy_code": [7]}))}, "a")

    with pytest.raises(WarehouseError, match=r"has columns \['batch_id', 'legacy_code'\]; the platform writes \['batch_id', 'encounter_id'"):
        warehouse.replace_batch(writes(*batches["a"]), "a")
    assert warehouse.read_table(RAW).rows() == [("a", 7)]
    assert REJECTED not in warehouse.tables()


@pytest.mark.parametrize("table", ["Raw_Batches", "raw-batches", "raw_batches; DROP TABLE x", "1st"])
def test_table_name_must_be_a_plain_identifier(table):
    with pytest.raises(WarehouseError, match="is not a plain lower-case SQL identifier"):
        table_ddl(table, {"batch_id": pl.String()})


def test_ddl_quotes_column_names_and_maps_every_schema_type():
    ddl = table_ddl("features", FEATURE_SCHEMA | {"ingested_at": pl.Datetime("us", "UTC"), "age_years": pl.Int16()})
    assert '"A1Cresult" TEXT' in ddl and '"glyburide-metformin" TEXT' in ddl
    assert '"encounter_id" BIGINT' in ddl and '"readmitted_30d" BOOLEAN' in ddl
    assert '"age_years" SMALLINT' in ddl and '"ingested_at" TIMESTAMP WITH TIME ZONE' in ddl
    assert '"prior_visits" DOUBLE PRECISION' in ddl


@pytest.mark.parametrize(
    ("url", "kind", "where"),
    [
        ("postgresql://etl:secret@db.internal:5432/readmission", PostgresWarehouse, None),
        ("postgres://etl@db/readmission", PostgresWarehouse, None),
        ("duckdb:////var/lib/readmission/warehouse.duckdb", DuckDBWarehouse, "/var/lib/readmission/warehouse.duckdb"),
        ("duckdb:///warehouse.duckdb", DuckDBWarehouse, "warehouse.duckdb"),
        ("duckdb://warehouse.duckdb", DuckDBWarehouse, "warehouse.duckdb"),
        ("/srv/data/warehouse.duckdb", DuckDBWarehouse, "/srv/data/warehouse.duckdb"),
        ("warehouse.duckdb", DuckDBWarehouse, "warehouse.duckdb"),
    ],
)
def test_open_warehouse_picks_the_backend_from_the_url(url, kind, where):
    warehouse = open_warehouse(url)
    assert type(warehouse) is kind
    if where is None:
        assert warehouse.url == url
    else:
        assert warehouse.path == Path(where)


@pytest.mark.parametrize("url", ["mysql://db/readmission", "sqlite:///warehouse.db", "duckdb://s3://bucket/w.duckdb"])
def test_open_warehouse_refuses_other_schemes(url):
    with pytest.raises(WarehouseError, match="is neither postgresql://… nor duckdb:///path"):
        open_warehouse(url)


def test_duckdb_url_opens_the_same_file(tmp_path):
    warehouse = DuckDBWarehouse(tmp_path / "w.duckdb")
    assert open_warehouse(warehouse.url).path == warehouse.path


def test_describe_hides_credentials():
    warehouse = open_warehouse("postgresql://etl:secret@db.internal:5432/readmission")
    assert warehouse.describe() == "postgresql://***@db.internal:5432/readmission"
    assert "secret" not in str(WarehouseError(f"cannot connect to {warehouse.describe()}"))


@pytest.mark.postgres
def test_unreachable_postgres_is_a_warehouse_error(postgres_url):
    nowhere = urlsplit(postgres_url)._replace(netloc="nobody:secret@127.0.0.1:1").geturl()
    with pytest.raises(WarehouseError, match=r"cannot connect to postgresql://\*\*\*@127.0.0.1:1/") as raised:
        PostgresWarehouse(nowhere).tables()
    assert "secret" not in str(raised.value)


COUNTER = {"batch_id": pl.String(), "writer": pl.String(), "round": pl.Int64(), "n": pl.Int64()}


def _write_repeatedly(path: str, batch_id: str, rounds: int, start, outcome) -> None:
    try:
        warehouse = DuckDBWarehouse(Path(path))
        start.wait(timeout=60)
        for round_ in range(rounds):
            frame = pl.DataFrame(
                {"batch_id": batch_id, "writer": batch_id, "round": round_, "n": range(500)}, schema=COUNTER
            )
            warehouse.replace_batch({"counter": (COUNTER, frame)}, batch_id)
        outcome.put((batch_id, "ok"))
    except BaseException:
        outcome.put((batch_id, traceback.format_exc()))


def test_two_processes_writing_one_duckdb_file_both_succeed(tmp_path):
    context = multiprocessing.get_context("spawn")
    start, outcome = context.Barrier(2), context.Queue()
    rounds = 15
    writers = [
        context.Process(target=_write_repeatedly, args=(str(tmp_path / "w.duckdb"), batch_id, rounds, start, outcome))
        for batch_id in ("x", "y")
    ]
    for writer in writers:
        writer.start()
    results = dict(outcome.get(timeout=120) for _ in writers)
    for writer in writers:
        writer.join(timeout=30)

    assert results == {"x": "ok", "y": "ok"}
    counts = DuckDBWarehouse(tmp_path / "w.duckdb").query(
        'SELECT batch_id, MIN("round") AS first, MAX("round") AS last, COUNT(*) AS n FROM counter GROUP BY batch_id ORDER BY batch_id'
    )
    assert counts.rows() == [("x", rounds - 1, rounds - 1, 500), ("y", rounds - 1, rounds - 1, 500)]


def test_duckdb_writes_filled_row_groups_into_the_file_before_the_commit(tmp_path):
    # Compressing a batch at the commit, after the pass, is what made the DuckDB path slow; the loader does it now.
    columns = {"batch_id": pl.String(), "n": pl.Int64(), "note": pl.String()}
    rows = 2 * ROW_GROUP_SIZE
    frame = pl.DataFrame({"batch_id": "a", "n": range(rows), "note": [f"note {i % 97}" for i in range(rows)]}, schema=columns)
    path = tmp_path / "w.duckdb"
    warehouse = DuckDBWarehouse(path)
    with warehouse.batch_writer("a") as writer:
        empty = path.stat().st_size
        writer.put("notes", columns, frame)
        for load in writer.loads:
            load.result()
        written = path.stat().st_size
    assert written - empty > 32_768, f"the file grew by {written - empty} bytes before the commit"
    assert_frame_equal(warehouse.read_table("notes").sort("n"), frame)


def test_replace_table_swaps_every_row_and_append_adds(warehouse):
    columns = {"name": pl.String(), "score": pl.Float64()}
    warehouse.replace_table("scores", columns, pl.DataFrame({"name": ["a", "b"], "score": [1.0, 2.0]}))
    warehouse.replace_table("scores", columns, pl.DataFrame({"name": ["c"], "score": [3.0]}))
    assert warehouse.read_table("scores").rows() == [("c", 3.0)]

    warehouse.append("scores", columns, pl.DataFrame({"name": ["d"], "score": [4.0]}))
    assert sorted(warehouse.read_table("scores").rows()) == [("c", 3.0), ("d", 4.0)]


def test_a_block_shares_one_connection_and_still_sees_its_own_writes(warehouse):
    columns = {"batch_id": pl.String(), "n": pl.Int64()}
    with warehouse:
        kept = warehouse._connection
        warehouse.replace_batch({"counts": (columns, pl.DataFrame({"batch_id": ["x"], "n": [1]}))}, "x")
        assert warehouse.read_table("counts", "x")["n"].to_list() == [1]
        assert warehouse._connection is kept
    assert warehouse._connection is None
    assert warehouse.read_table("counts", "x")["n"].to_list() == [1]


@pytest.mark.postgres
def test_a_value_another_batch_stores_meanwhile_fails_the_write_and_writes_nothing(pg_schema_url, batches):
    warehouse = PostgresWarehouse(pg_schema_url)
    raw_a, rejected_a = batches["a"]
    seed = raw_a.head(5).with_columns(batch_id=pl.lit("seed"))
    warehouse.replace_batch(writes(seed, rejected_a.clear()), "seed")  # five of batch a's ids, stored before

    with pytest.raises(ConflictingWrite, match=r"raw_batches.encounter_id \d+ \(stored meanwhile by batch rival\)"):
        with warehouse.batch_writer("a") as writer:
            seen = writer.stored_elsewhere(RAW, "encounter_id")
            writer.put(RAW, schema.RAW_SCHEMA, raw_a)
            rival = raw_a.slice(100, 3).with_columns(batch_id=pl.lit("rival"))
            warehouse.replace_batch({RAW: (schema.RAW_SCHEMA, rival)}, "rival")  # committed while "a" is staged

    assert seen["batch_id"].unique().to_list() == ["seed"] and seen.height == 5  # what "a" read before the rival came
    assert warehouse.query("SELECT count(*) AS n FROM raw_batches WHERE batch_id = 'a'")["n"][0] == 0
    assert warehouse.tables() == {RAW, REJECTED}  # the staged table is gone too
    leftovers = warehouse.query("SELECT count(*) AS n FROM pg_tables WHERE schemaname = current_schema() AND tablename LIKE '%\\_\\_p%'")
    assert leftovers["n"][0] == 2  # the raw partitions of seed and rival; no rows, no partition


@pytest.mark.postgres
def test_a_text_value_another_file_stores_meanwhile_fails_the_write(pg_schema_url):
    # Two files of outcomes naming one request, stored side by side: the second to commit is judged again.
    warehouse = PostgresWarehouse(pg_schema_url)
    columns = {"batch_id": pl.String(), "request_id": pl.String()}
    warehouse.replace_batch({"answers": (columns, pl.DataFrame({"batch_id": ["seed"], "request_id": ["r0"]}))}, "seed")

    with pytest.raises(ConflictingWrite, match=r"answers.request_id r2 \(stored meanwhile by batch rival\)"):
        with warehouse.batch_writer("a") as writer:
            seen = writer.stored_elsewhere("answers", "request_id", text=True)
            writer.put("answers", columns, pl.DataFrame({"batch_id": ["a"] * 3, "request_id": ["r1", "r2", "r3"]}))
            rival = pl.DataFrame({"batch_id": ["rival"], "request_id": ["r2"]})
            warehouse.replace_batch({"answers": (columns, rival)}, "rival")  # committed while "a" is staged

    assert seen.rows() == [("r0", "seed")]
    assert sorted(warehouse.read_table("answers")["request_id"]) == ["r0", "r2"]


@pytest.mark.postgres
def test_what_a_crashed_writer_left_staged_is_dropped_by_the_next_write_of_its_batch(pg_schema_url, batches):
    warehouse = PostgresWarehouse(pg_schema_url)
    raw, rejected = batches["a"]
    warehouse.replace_batch(writes(raw, rejected), "a")
    leftover = partition_prefix(RAW, "a") + "deadbeef"
    with psycopg.connect(pg_schema_url, autocommit=True) as connection:
        connection.execute(f"CREATE TABLE {leftover} (LIKE raw_batches)")

    warehouse.replace_batch(writes(raw, rejected), "a")

    names = warehouse.query("SELECT tablename FROM pg_tables WHERE schemaname = current_schema()")["tablename"].to_list()
    assert leftover not in names
    assert_frame_equal(stored(warehouse, RAW), raw)


@pytest.mark.postgres
def test_writers_come_from_a_pool_that_replaces_connections_the_server_closed(pg_schema_url, batches):
    from psycopg_pool import ConnectionPool

    warehouse = PostgresWarehouse(pg_schema_url)
    raw, rejected = batches["a"]
    warehouse.replace_batch(writes(raw, rejected), "a")
    pool = PostgresWarehouse._pools[pg_schema_url]
    assert isinstance(pool, ConnectionPool)
    kept = [pool.getconn() for _ in range(pool.get_stats()["pool_available"])]
    pids = {connection.info.backend_pid for connection in kept}
    for connection in kept:
        pool.putconn(connection)
    assert pids  # the write's connections wait in the pool for the next one
    with psycopg.connect(pg_schema_url, autocommit=True) as admin:
        admin.execute("SELECT pg_terminate_backend(pid) FROM unnest(%s::int[]) AS pid", [sorted(pids)])

    raw_b, rejected_b = batches["b"]
    warehouse.replace_batch(writes(raw_b, rejected_b), "b")

    assert_frame_equal(stored(warehouse, RAW), pl.concat([raw, raw_b]).sort("batch_id", "line_number"))
    with warehouse._writer() as connection:
        assert connection.info.backend_pid not in pids


def test_decisions_recorded_in_a_table_of_an_earlier_version_widen_it_and_keep_its_rows(warehouse):
    from readmission_platform.lib.promotion import DECISION_SCHEMA, DECISIONS, record_decisions, rollback_row

    now = datetime(2026, 12, 1, tzinfo=UTC)
    earlier = {name: dtype for name, dtype in list(DECISION_SCHEMA.items())[:-6]}  # made before the last six columns
    old = pl.DataFrame([rollback_row(replaced="2", restored="1", reason="before the upgrade", now=now)], schema=DECISION_SCHEMA)
    warehouse.append(DECISIONS, earlier, old.select(list(earlier)))
    new = pl.DataFrame([rollback_row(replaced="3", restored="2", reason="after it", now=now)], schema=DECISION_SCHEMA)
    record_decisions(warehouse, new)
    stored = warehouse.read_table(DECISIONS)
    assert list(stored.columns) == list(DECISION_SCHEMA)
    assert stored.sort("decided_at", "champion_version")["champion_version"].to_list() == ["2", "3"]
    added = [name for name in DECISION_SCHEMA if name not in earlier]
    assert stored.filter(pl.col("champion_version") == "2").select(added).null_count().row(0) == (1,) * len(added)
    record_decisions(warehouse, new)  # a table of today's layout is appended to as it is
    assert warehouse.read_table(DECISIONS).height == 3


def test_a_table_whose_columns_are_not_a_prefix_of_the_wanted_ones_is_not_widened(warehouse):
    frame = pl.DataFrame({"a": [1], "b": ["x"]})
    warehouse.append("widened", {"a": pl.Int64(), "b": pl.String()}, frame)
    with pytest.raises(WarehouseError, match="has columns"):
        warehouse.add_columns("widened", {"b": pl.String(), "a": pl.Int64(), "c": pl.Float64()})
    assert warehouse.add_columns("widened", {"a": pl.Int64(), "b": pl.String(), "c": pl.Float64()}) == ["c"]
    assert warehouse.read_table("widened").to_dicts() == [{"a": 1, "b": "x", "c": None}]
    assert warehouse.add_columns("never_made", {"a": pl.Int64()}) == []
