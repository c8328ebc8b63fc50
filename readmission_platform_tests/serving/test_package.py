"""What a packer killed mid-copy leaves in BentoML's stores, and how the next one clears it."""

from __future__ import annotations

from readmission_platform.serving.package import _drop_unfinished


def test_the_next_packer_drops_store_entries_a_killed_one_left_without_their_manifest(tmp_path):
    finished_model, half_model = tmp_path / "models/readmission-classifier/v1", tmp_path / "models/readmission-classifier/v2"
    finished_bento, half_bento = tmp_path / "bentos/readmission/aaaa", tmp_path / "bentos/readmission/bbbb"
    for entry in (finished_model, half_model, finished_bento, half_bento):
        (entry / "src").mkdir(parents=True)
    (finished_model / "model.yaml").write_text("name: readmission-classifier\n")
    (finished_bento / "bento.yaml").write_text("name: readmission\n")
    (tmp_path / "bentos/readmission/latest").write_text("aaaa")

    _drop_unfinished(tmp_path)

    assert finished_model.is_dir() and finished_bento.is_dir()
    assert not half_model.exists() and not half_bento.exists()
    assert (tmp_path / "bentos/readmission/latest").read_text() == "aaaa"
