import csv
import random
from datetime import UTC, datetime

import polars as pl
import pytest
from polars.testing import assert_frame_equal

from readmission_platform.lib import schema
from readmission_platform.lib.ingest import BatchFileError, parse_batch

NOW = datetime(2024, 5, 1, 12, tzinfo=UTC)
NOTHING_LOADED = pl.DataFrame(schema={"encounter_id": pl.Int64, schema.BATCH_ID: pl.String})


@pytest.fixture(scope="module")
def sample_lines(sample_source_bytes) -> list[str]:
    """The sample's lines without endings; [0] is the header."""
    return sample_source_bytes.decode("utf-8").splitlines()


def batch(lines: list[str]) -> bytes:
    return ("\r\n".join(lines) + "\r\n").encode("utf-8")


def parse(content: bytes, loaded_elsewhere: pl.DataFrame = NOTHING_LOADED, **lineage):
    lineage = {"batch_id": "batch_0002", "source_file": "batch_0002.csv", "now": NOW} | lineage
    return parse_batch(content, loaded_elsewhere=loaded_elsewhere, **lineage)


def with_field(line: str, column: str, value: str) -> str:
    fields = line.split(",")
    fields[schema.RAW_COLUMNS.index(column)] = value
    return ",".join(fields)


def test_good_file_loads_every_row_as_text_with_lineage(sample_lines):
    parsed = parse(batch(sample_lines[:101]))

    assert parsed.rejected.is_empty()
    assert parsed.rows.schema == pl.Schema(schema.RAW_SCHEMA)
    assert parsed.rows.height == 100
    assert parsed.rows.select(schema.RAW_COLUMNS).rows() == [tuple(line.split(",")) for line in sample_lines[1:101]]
    assert parsed.rows["line_number"].to_list() == list(range(2, 102))
    assert set(parsed.rows["batch_id"]) == {"batch_0002"}
    assert set(parsed.rows["source_file"]) == {"batch_0002.csv"}
    assert set(parsed.rows["ingested_at"]) == {NOW}
    assert parsed.rejected.schema == pl.Schema(schema.REJECTED_SCHEMA)


def test_whole_data_set_loads_without_rejections(full_raw):
    assert full_raw.height == 101_766
    assert full_raw["encounter_id"].n_unique() == 101_766
    assert full_raw["patient_nbr"].n_unique() == 71_518
    assert dict(full_raw["readmitted"].value_counts().iter_rows()) == {"NO": 54_864, ">30": 35_545, "<30": 11_357}


@pytest.mark.parametrize(
    ("rename", "message"),
    [
        ({"weight": None}, r"missing \['weight'\]"),
        ({"weight": "weight_kg"}, r"missing \['weight'\]; unexpected \['weight_kg'\]"),
        ({"diabetesMed": "diabetesMed,shoe_size"}, r"unexpected \['shoe_size'\]"),
        ({"race": "race,race"}, r"repeated \['race'\]"),
    ],
)
def test_header_that_is_not_the_schema_fails_the_whole_file(sample_lines, rename, message):
    header = [
        renamed for name in sample_lines[0].split(",") if (renamed := rename.get(name, name)) is not None
    ]
    with pytest.raises(BatchFileError, match=rf"batch_0002.csv: header does not match the encounter schema: {message}"):
        parse(batch([",".join(header), *sample_lines[1:4]]))


@pytest.mark.parametrize("content", [b"", b"\r\n", b"   \n\n"])
def test_empty_file_fails(content):
    with pytest.raises(BatchFileError, match="batch_0002.csv is empty"):
        parse(content)


def test_header_only_fails(sample_lines):
    for content in (sample_lines[0].encode(), batch(sample_lines[:1]), batch([sample_lines[0], "", ""])):
        with pytest.raises(BatchFileError, match="holds a header but no encounters"):
            parse(content)


def test_truncated_last_row_is_rejected_and_the_good_rows_load(sample_lines):
    cut = sample_lines[20][: len(sample_lines[20]) // 2]
    content = batch(sample_lines[:20]) + cut.encode()

    parsed = parse(content)

    assert parsed.rows.height == 19
    rejected = parsed.rejected.row(0, named=True)
    assert parsed.rejected.height == 1
    assert rejected["line_number"] == 21
    assert rejected["reason"] == f"has {cut.count(',') + 1} fields; expected 50"
    assert rejected["encounter_id"] == cut.split(",")[0]
    assert rejected["raw_line"] == cut
    assert (rejected["batch_id"], rejected["source_file"], rejected["rejected_at"]) == ("batch_0002", "batch_0002.csv", NOW)


def test_a_rejected_line_of_a_crlf_file_is_kept_without_its_line_ending(sample_lines):
    cut = sample_lines[5][: len(sample_lines[5]) // 2]
    parsed = parse(batch([*sample_lines[:5], cut, *sample_lines[6:11]]))

    assert parsed.rejected["raw_line"].to_list() == [cut]
    assert parsed.rows.select(schema.RAW_COLUMNS).rows() == [tuple(line.split(",")) for line in sample_lines[1:11] if line != sample_lines[5]]


def test_row_with_too_many_fields_is_rejected(sample_lines):
    parsed = parse(batch([*sample_lines[:3], sample_lines[3] + ",extra", *sample_lines[4:6]]))

    assert parsed.rows["line_number"].to_list() == [2, 3, 5, 6]
    assert parsed.rejected.select("line_number", "reason").rows() == [(4, "has 51 fields; expected 50")]


@pytest.mark.parametrize(
    ("column", "value", "reason"),
    [
        ("encounter_id", "abc", "encounter_id 'abc' is not a positive integer"),
        ("encounter_id", "", "encounter_id '' is not a positive integer"),
        ("encounter_id", "0", "encounter_id '0' is not a positive integer"),
        ("encounter_id", "-7", "encounter_id '-7' is not a positive integer"),
        ("encounter_id", "12.5", "encounter_id '12.5' is not a positive integer"),
        ("encounter_id", "9" * 19, f"encounter_id '{'9' * 19}' is not a positive integer"),
        ("patient_nbr", "?", "patient_nbr '?' is not a positive integer"),
        ("patient_nbr", "8222157x", "patient_nbr '8222157x' is not a positive integer"),
    ],
)
def test_row_whose_id_is_not_a_positive_integer_is_rejected(sample_lines, column, value, reason):
    parsed = parse(batch([*sample_lines[:3], with_field(sample_lines[3], column, value), sample_lines[4]]))

    assert parsed.rows["line_number"].to_list() == [2, 3, 5]
    assert parsed.rejected.select("line_number", "encounter_id", "reason").rows() == [
        (4, sample_lines[3].split(",")[0] if column == "patient_nbr" else value, reason)
    ]


def test_duplicate_encounter_in_the_batch_keeps_the_first_and_names_it(sample_lines):
    first_id = sample_lines[2].split(",")[0]
    again = with_field(sample_lines[5], "encounter_id", first_id)
    parsed = parse(batch([*sample_lines[:5], again, sample_lines[6]]))

    assert parsed.rows["line_number"].to_list() == [2, 3, 4, 5, 7]
    assert parsed.rows.filter(pl.col("encounter_id") == first_id)["line_number"].to_list() == [3]
    assert parsed.rejected.select("line_number", "reason").rows() == [
        (6, f"encounter_id {first_id} repeats line 3 of this batch")
    ]


def test_a_rejected_row_does_not_shadow_a_later_good_copy_of_its_id(sample_lines):
    first_id = sample_lines[2].split(",")[0]
    broken = with_field(sample_lines[2], "patient_nbr", "?")
    parsed = parse(batch([sample_lines[0], sample_lines[1], broken, sample_lines[3], sample_lines[2]]))

    assert parsed.rows.filter(pl.col("encounter_id") == first_id)["line_number"].to_list() == [5]
    assert parsed.rejected.select("line_number", "reason").rows() == [(3, "patient_nbr '?' is not a positive integer")]


def test_encounter_loaded_in_another_batch_is_rejected_naming_it(sample_lines):
    loaded = pl.DataFrame(
        {"encounter_id": [int(sample_lines[3].split(",")[0]), 1], schema.BATCH_ID: ["batch_0001", "batch_0001"]}
    )
    parsed = parse(batch(sample_lines[:6]), loaded_elsewhere=loaded)

    assert parsed.rows["line_number"].to_list() == [2, 3, 5, 6]
    assert parsed.rejected.select("line_number", "reason").rows() == [
        (4, f"encounter_id {sample_lines[3].split(',')[0]} was already loaded in batch batch_0001")
    ]


def test_rejected_rows_are_sorted_by_line(sample_lines):
    lines = [*sample_lines[:8]]
    lines[6] = lines[6][:40]
    lines[3] = with_field(lines[3], "encounter_id", "x")
    lines[5] = with_field(lines[5], "encounter_id", lines[2].split(",")[0])

    assert parse(batch(lines)).rejected["line_number"].to_list() == [4, 6, 7]


def test_bytes_that_are_not_utf8_fail_the_file_naming_the_offset(sample_lines):
    content = batch(sample_lines[:3]).replace(b"Pediatrics", b"P\xe9diatrics", 1)
    offset = content.index(b"\xe9")
    with pytest.raises(BatchFileError, match=f"batch_0002.csv is not UTF-8 text: byte 0xe9 at offset {offset}"):
        parse(content)


def test_byte_order_mark_is_not_part_of_the_first_column(sample_lines):
    parsed = parse(b"\xef\xbb\xbf" + batch(sample_lines[:3]))
    assert parsed.rows["encounter_id"].to_list() == [line.split(",")[0] for line in sample_lines[1:3]]


def test_shuffled_column_order_loads_the_same_rows(sample_lines):
    order = list(range(len(schema.RAW_COLUMNS)))
    random.Random(7).shuffle(order)
    shuffled = [",".join(line.split(",")[i] for i in order) for line in sample_lines[:51]]

    straight = parse(batch(sample_lines[:51])).rows
    assert_frame_equal(parse(batch(shuffled)).rows.drop("row_hash"), straight.drop("row_hash"))


def test_quoted_field_holding_a_comma_keeps_the_field(sample_lines):
    line = with_field(sample_lines[1], "medical_specialty", '"Surgery, General"')
    parsed = parse(batch([sample_lines[0], line, sample_lines[2]]))

    assert parsed.rejected.is_empty()
    assert parsed.rows["medical_specialty"][0] == "Surgery, General"


@pytest.mark.parametrize("value", ['Sur"gery', 'Surgery"', 'Sur"ge"ry', 'Surgery-"General'])
def test_a_quote_inside_an_unquoted_field_is_part_of_the_field(sample_lines, value):
    # As the csv module reads it: only a quote opening a field starts a quoted one.
    line = with_field(sample_lines[5], "medical_specialty", value)
    parsed = parse(batch([*sample_lines[:5], line, *sample_lines[6:21]]))

    assert parsed.rejected.is_empty()
    assert parsed.rows["line_number"].to_list() == list(range(2, 22))
    assert parsed.rows["medical_specialty"][4] == value
    assert parsed.rows.select(schema.RAW_COLUMNS).rows()[5:] == [tuple(line.split(",")) for line in sample_lines[6:21]]


@pytest.mark.parametrize(
    ("value", "cause"),
    [
        ('"Sur"gery', "',' expected after '\"'"),
        ('"Surgery" ', "',' expected after '\"'"),
        ('"Surgery', "unexpected end of data"),
        ('"Sur,gery', "unexpected end of data"),
    ],
)
def test_a_quoted_field_that_does_not_close_where_it_ends_is_rejected_and_the_rest_load(sample_lines, value, cause):
    line = with_field(sample_lines[5], "medical_specialty", value)
    parsed = parse(batch([*sample_lines[:5], line, *sample_lines[6:21]]))

    assert parsed.rows["line_number"].to_list() == [n for n in range(2, 22) if n != 6]
    assert parsed.rows.select(schema.RAW_COLUMNS).rows() == [tuple(line.split(",")) for line in [*sample_lines[1:5], *sample_lines[6:21]]]
    rejected = parsed.rejected.row(0, named=True)
    assert parsed.rejected.height == 1
    assert (rejected["line_number"], rejected["raw_line"], rejected["encounter_id"]) == (6, line, line.split(",")[0])
    assert rejected["reason"] == (
        f"is not valid CSV ({cause}): a quote may open a field only if another closes it, "
        'and a quote inside a quoted field is written twice ("")'
    )


def test_a_quoted_line_with_a_nul_byte_is_rejected_and_the_quoted_lines_after_it_keep_their_fields(sample_lines):
    nul = with_field(sample_lines[2], "medical_specialty", '"Sur\x00gery"')
    after = with_field(sample_lines[4], "medical_specialty", '"Surgery, General"')
    parsed = parse(batch([*sample_lines[:2], nul, sample_lines[3], after]))

    assert parsed.rejected.select("line_number", "reason").rows() == [(3, "holds a NUL byte, which no field may contain")]
    assert parsed.rows["line_number"].to_list() == [2, 4, 5]
    assert parsed.rows["medical_specialty"].to_list()[1:] == [sample_lines[3].split(",")[schema.RAW_COLUMNS.index("medical_specialty")], "Surgery, General"]


def test_row_hash_depends_on_the_line_text_only(sample_lines):
    one = parse(batch(sample_lines[:11])).rows
    again = parse(batch([sample_lines[0], *sample_lines[11:14], *sample_lines[1:11]]), batch_id="b9", now=datetime.now(UTC)).rows
    edited = parse(batch([sample_lines[0], with_field(sample_lines[1], "race", "Other")])).rows

    assert one["row_hash"].n_unique() == 10
    assert one["row_hash"].str.contains(r"^[0-9a-f]{32}$").all()
    assert dict(zip(one["encounter_id"], one["row_hash"])).items() <= dict(zip(again["encounter_id"], again["row_hash"])).items()
    assert edited["row_hash"][0] != one["row_hash"][0]


def test_line_number_is_the_line_in_the_file(sample_lines):
    lines = [sample_lines[0], sample_lines[1], "", sample_lines[2], "   ", "", sample_lines[3][:30], sample_lines[4]]
    content = "\n".join(lines).encode()

    parsed = parse(content)
    file_lines = content.decode().split("\n")

    for row in parsed.rows.iter_rows(named=True):
        assert file_lines[row["line_number"] - 1].split(",")[0] == row["encounter_id"]
    assert parsed.rows["line_number"].to_list() == [2, 4, 8]
    assert parsed.rejected["line_number"].to_list() == [7]


@pytest.mark.parametrize("separator", ["\x0c", "\x1e", "\x85", "\u2028"])
def test_line_separator_characters_inside_a_field_do_not_split_the_row(sample_lines, separator):
    # Only CR and LF end a line in a CSV file; str.splitlines() would also break at these.
    line = with_field(sample_lines[1], "medical_specialty", f"Pediatrics{separator}Endocrinology")
    parsed = parse(batch([sample_lines[0], line, sample_lines[2]]))

    assert parsed.rejected.is_empty()
    assert parsed.rows["line_number"].to_list() == [2, 3]
    assert parsed.rows["medical_specialty"][0] == f"Pediatrics{separator}Endocrinology"


def test_every_field_of_the_real_lines_is_kept_verbatim(sample_source_bytes):
    parsed = parse(sample_source_bytes)
    expected = list(csv.reader(sample_source_bytes.decode().splitlines()))

    assert parsed.rows.select(schema.RAW_COLUMNS).rows() == [tuple(row) for row in expected[1:]]
