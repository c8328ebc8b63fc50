import hashlib
import zipfile

import pytest

from readmission_platform.lib import source
from readmission_platform.lib.source import SourceError, read_source_bytes


def test_bundled_zip_verifies_and_yields_the_published_csv(full_source_bytes):
    assert hashlib.sha256(source.bundled_source().read_bytes()).hexdigest() == source.BUNDLED_ZIP_SHA256
    assert hashlib.sha256(full_source_bytes).hexdigest() == source.BUNDLED_CSV_SHA256


def test_verified_names_the_file_and_both_checksums():
    with pytest.raises(SourceError, match=r"thing\.csv has sha256 [0-9a-f]{64}; expected 0{64}"):
        source._verified(b"data", "0" * 64, "thing.csv")
    assert source._verified(b"data", hashlib.sha256(b"data").hexdigest(), "thing.csv") == b"data"


def _tampered_copy(tmp_path, offset):
    data = bytearray(source.bundled_source().read_bytes())
    data[offset] ^= 0xFF
    path = tmp_path / "dataset_diabetes.zip"
    path.write_bytes(bytes(data))
    return path


def test_tampered_zip_at_the_bundled_location_is_refused(tmp_path, monkeypatch):
    # A byte flipped in the zip's directory leaves the archive readable: only the checksum can catch it.
    size = source.bundled_source().stat().st_size
    tampered = _tampered_copy(tmp_path, size - 30)
    monkeypatch.setattr(source, "bundled_source", lambda: tampered)
    with pytest.raises(SourceError, match="damaged or was replaced"):
        read_source_bytes()


@pytest.mark.parametrize("offset", [200, 1_000_000])
def test_damaged_copy_elsewhere_raises_source_error(tmp_path, offset):
    # Copies at other paths are not checksummed; damage to the compressed CSV is caught by the zip's own CRC.
    with pytest.raises(SourceError, match="dataset_diabetes.zip is not a readable zip archive"):
        read_source_bytes(_tampered_copy(tmp_path, offset))


def test_file_named_zip_that_is_not_a_zip_is_refused(tmp_path, sample_source_bytes):
    path = tmp_path / "export.zip"
    path.write_bytes(sample_source_bytes)
    with pytest.raises(SourceError, match="export.zip is not a readable zip archive"):
        read_source_bytes(path)


def test_missing_source_is_named(tmp_path):
    with pytest.raises(SourceError, match="nope.zip does not exist"):
        read_source_bytes(tmp_path / "nope.zip")


def test_plain_csv_export_is_read_verbatim(tmp_path, sample_source_bytes):
    path = tmp_path / "export.CSV"
    path.write_bytes(sample_source_bytes)
    assert read_source_bytes(path) == sample_source_bytes


def test_other_zip_with_one_encounter_csv_besides_the_mapping(tmp_path, sample_source_bytes):
    path = tmp_path / "export.zip"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("export/IDs_mapping.csv", b"admission_type_id,description\n")
        archive.writestr("export/encounters.csv", sample_source_bytes)
    assert read_source_bytes(path) == sample_source_bytes


@pytest.mark.parametrize("members", [[], ["a.csv", "b.csv"]])
def test_zip_without_exactly_one_encounter_csv_is_refused(tmp_path, members):
    path = tmp_path / "export.zip"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("README.txt", b"hello")
        for name in members:
            archive.writestr(name, b"encounter_id\n1\n")
    with pytest.raises(SourceError, match="expected exactly one encounter CSV"):
        read_source_bytes(path)
