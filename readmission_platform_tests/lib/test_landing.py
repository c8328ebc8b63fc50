import pytest

from readmission_platform.lib import landing
from readmission_platform.lib.landing import land, split_batches


def _header_and_body(csv_bytes: bytes) -> tuple[bytes, bytes]:
    header_end = csv_bytes.index(b"\n") + 1
    return csv_bytes[:header_end], csv_bytes[header_end:]


def test_full_source_splits_into_six_full_batches_and_a_rest(full_source_bytes):
    batches = split_batches(full_source_bytes)
    header, body = _header_and_body(full_source_bytes)

    assert [len(b.splitlines()) - 1 for b in batches] == [15_000] * 6 + [11_766]
    assert all(b.startswith(header) for b in batches)
    assert b"".join(b[len(header) :] for b in batches) == body


def test_blank_lines_are_not_encounters(sample_source_bytes):
    header, body = _header_and_body(sample_source_bytes)
    lines = body.splitlines(keepends=True)[:5]
    with_blanks = header + b"\r\n".join([b"".join(lines[:2]), b"".join(lines[2:])]) + b"\r\n\r\n"

    batches = split_batches(with_blanks, batch_size=2)

    assert [b[len(header) :] for b in batches] == [b"".join(lines[:2]), b"".join(lines[2:4]), lines[4]]


def test_empty_source_has_no_batches():
    assert split_batches(b"") == []


def test_land_in_two_steps_names_batches_in_order_with_the_original_bytes(tmp_path, full_source_bytes):
    expected = split_batches(full_source_bytes)

    first = land(full_source_bytes, tmp_path, count=2)
    rest = land(full_source_bytes, tmp_path, count=None)

    assert [(x.path.name, x.rows) for x in first] == [("batch_0001.csv", 15_000), ("batch_0002.csv", 15_000)]
    assert [x.path.name for x in rest] == [f"batch_{i:04d}.csv" for i in range(3, 8)]
    assert rest[-1].rows == 11_766
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"batch_{i:04d}.csv" for i in range(1, 8)]
    assert [p.read_bytes() for p in landing.landed_files(tmp_path)] == expected


def test_land_when_everything_landed_writes_nothing(tmp_path, sample_source_bytes):
    land(sample_source_bytes, tmp_path, count=None, batch_size=1_000)
    before = {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()}

    assert land(sample_source_bytes, tmp_path, count=None, batch_size=1_000) == []
    assert land(sample_source_bytes, tmp_path, count=1, batch_size=1_000) == []
    assert {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()} == before


def test_land_refuses_a_source_with_another_header_and_writes_nothing(tmp_path, sample_source_bytes):
    renamed = sample_source_bytes.replace(b"encounter_id,", b"visit_id,", 1)
    with pytest.raises(ValueError, match="encounter_id"):
        land(renamed, tmp_path, count=None)
    assert list(tmp_path.iterdir()) == []


def test_a_source_whose_lines_end_in_cr_alone_lands_the_same_encounters(tmp_path, sample_source_bytes):
    lines = sample_source_bytes.splitlines()[:8]
    cr_only = b"\r".join(lines) + b"\r"

    landed = land(cr_only, tmp_path, count=None, batch_size=3)

    assert [(x.path.name, x.rows) for x in landed] == [("batch_0001.csv", 3), ("batch_0002.csv", 3), ("batch_0003.csv", 1)]
    assert [p.read_bytes().split(b"\r")[1:-1] for p in landing.landed_files(tmp_path)] == [lines[1:4], lines[4:7], lines[7:8]]
    assert all(p.read_bytes().startswith(lines[0] + b"\r") for p in landing.landed_files(tmp_path))


@pytest.mark.parametrize("ending", [b"", b"\n", b"\r\n", b"\r", b"\r\n\r\n  \r\n"])
def test_land_refuses_a_source_with_a_header_and_no_encounters_and_writes_nothing(tmp_path, sample_source_bytes, ending):
    header_only = sample_source_bytes.splitlines()[0] + ending

    with pytest.raises(ValueError, match=r"^source export\.csv not landed: it holds a header but no encounters$"):
        land(header_only, tmp_path / "landing", count=1, source="source export.csv")
    assert list(tmp_path.iterdir()) == []


def test_landed_files_skip_hidden_and_partial_files(tmp_path):
    for name in ("batch_0002.csv", "batch_0001.csv", ".batch_0003.csv.partial", ".hidden.csv", "notes.txt"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "folder.csv").mkdir()

    assert [p.name for p in landing.landed_files(tmp_path)] == ["batch_0001.csv", "batch_0002.csv"]
    assert landing.landed_files(tmp_path / "absent") == []


def test_batch_id_is_the_stem_made_safe_for_a_partition_key(tmp_path):
    upstream = tmp_path / "export 2024-01 (final).csv"
    upstream.write_bytes(b"x")

    assert landing.batch_id_for(tmp_path / "batch_0001.csv") == "batch_0001"
    assert landing.batch_id_for(upstream) == "export_2024-01__final_"
    assert landing.find_batch_file(tmp_path, "export_2024-01__final_") == upstream
    assert landing.find_batch_file(tmp_path, "batch_0009") is None


def test_two_names_of_one_batch_id_find_no_file_but_an_error_naming_both(tmp_path):
    for name in ("batch_1.csv", "batch 1.csv", "batch_2.csv"):
        (tmp_path / name).write_bytes(b"x")

    with pytest.raises(landing.AmbiguousBatchFile, match=r"the files 'batch 1\.csv', 'batch_1\.csv' all make the batch id 'batch_1'"):
        landing.find_batch_file(tmp_path, "batch_1")
    assert landing.find_batch_file(tmp_path, "batch_2") == tmp_path / "batch_2.csv"
