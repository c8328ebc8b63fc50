import polars as pl
import pytest

from readmission_platform.lib.features import build_features
from readmission_platform.lib.splitting import SPLIT, SPLIT_FRACTIONS, assign_split, split_overlap


@pytest.fixture(scope="module")
def features(full_clean) -> pl.DataFrame:
    return build_features(full_clean.frame)


def sides(frame: pl.DataFrame) -> dict[int, str]:
    return dict(assign_split(frame).select("encounter_id", SPLIT).iter_rows())


def test_every_row_gets_one_of_the_three_splits(features):
    split = assign_split(features)

    assert split.height == features.height
    assert split.drop(SPLIT).equals(features)
    assert set(split[SPLIT].unique()) == set(SPLIT_FRACTIONS)


def test_same_rows_get_the_same_splits_on_every_call_and_in_any_order(features):
    shuffled = features.sample(fraction=1.0, shuffle=True, seed=7)

    assert assign_split(features).equals(assign_split(features))
    assert sides(shuffled) == sides(features)


def test_later_batches_never_move_a_patient(features):
    first_batch = features.head(20_000)
    before = assign_split(first_batch).select("patient_nbr", SPLIT).unique()
    after = assign_split(features).select("patient_nbr", SPLIT).unique()

    moved = before.join(after, on="patient_nbr", suffix="_after").filter(pl.col(SPLIT) != pl.col(f"{SPLIT}_after"))
    assert moved.is_empty(), moved.head()


def test_sides_are_pinned_to_the_patient_id():
    # A change of hash or key would move these patients, and with them years of test patients into training.
    frame = pl.DataFrame({"patient_nbr": [8222157, 55629189, 82442376, 42519267]})

    assert assign_split(frame)[SPLIT].to_list() == ["train", "train", "test", "test"]


def test_shares_of_patients_and_rows_are_near_70_15_15(features):
    split = assign_split(features)
    patient_share = split.unique("patient_nbr").group_by(SPLIT).len().with_columns(pl.col("len") / pl.col("len").sum())
    row_share = split.group_by(SPLIT).len().with_columns(pl.col("len") / pl.col("len").sum())

    for shares in (patient_share, row_share):
        for name, share in shares.iter_rows():
            assert share == pytest.approx(SPLIT_FRACTIONS[name], abs=0.01), (name, share)


def test_no_patient_is_on_two_sides_of_the_full_data(features):
    assert split_overlap(assign_split(features)) == {"patients": 69_987, "patients_in_several_splits": 0}


def test_overlap_counts_a_patient_split_across_sides():
    frame = pl.DataFrame({"patient_nbr": [1, 1, 2, 2, 3], SPLIT: ["train", "test", "test", "test", "validation"]})

    assert split_overlap(frame) == {"patients": 3, "patients_in_several_splits": 1}


def test_rows_without_a_patient_cannot_be_split():
    with pytest.raises(ValueError, match="no 'patient_nbr' column"):
        assign_split(pl.DataFrame({"encounter_id": [1]}))
    with pytest.raises(ValueError, match="'patient_nbr' is null in 1 rows"):
        assign_split(pl.DataFrame({"patient_nbr": [1, None]}, schema={"patient_nbr": pl.Int64}))
