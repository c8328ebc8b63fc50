import numpy as np
import polars as pl
import pytest

from readmission_platform.lib.drift import PSI_MODERATE, PSI_SIGNIFICANT, psi_report
from readmission_platform.lib.features import FEATURE_COLUMNS, build_features
from readmission_platform.lib.splitting import SPLIT, assign_split


@pytest.fixture(scope="module")
def split(full_clean) -> pl.DataFrame:
    return assign_split(build_features(full_clean.frame))


@pytest.fixture(scope="module")
def train(split) -> pl.DataFrame:
    return split.filter(pl.col(SPLIT) == "train")


def psi_of(report: pl.DataFrame) -> dict[str, float]:
    return dict(report.select("feature", "psi").iter_rows())


def small(x, c) -> pl.DataFrame:
    return pl.DataFrame({"x": x, "c": c}, schema={"x": pl.Float64, "c": pl.String})


def test_identical_data_has_no_drift_in_any_feature(train):
    report = psi_report(train, train)

    assert sorted(report["feature"]) == sorted(FEATURE_COLUMNS)
    assert report["psi"].abs().max() < 1e-12


def test_other_patients_of_the_same_years_are_stable(train, split):
    report = psi_report(train, split.filter(pl.col(SPLIT) == "test"))

    assert report["psi"].max() < PSI_MODERATE, report.head()


def test_a_shifted_numeric_feature_drifts_and_nothing_else(train):
    report = psi_report(train, train.with_columns(pl.col("num_medications") + 8))
    psi = psi_of(report)

    assert report.row(0, named=True) == {"feature": "num_medications", "psi": psi["num_medications"], "kind": "numeric"}
    assert psi["num_medications"] > PSI_SIGNIFICANT
    assert max(v for name, v in psi.items() if name != "num_medications") < 1e-12


def test_a_category_never_seen_in_training_drifts(train):
    rng = np.random.default_rng(0)
    renamed = pl.Series(rng.random(train.height) < 0.3)
    current = train.with_columns(pl.when(renamed).then(pl.lit("Martian")).otherwise(pl.col("race")).alias("race"))
    report = psi_report(train, current)

    assert report.row(0, named=True)["feature"] == "race"
    assert report.row(0, named=True)["kind"] == "categorical"
    assert psi_of(report)["race"] > PSI_SIGNIFICANT


def test_a_constant_reference_column_gets_two_bins():
    reference = small([5.0] * 100, ["a"] * 100)

    same = psi_of(psi_report(reference, reference, numeric=("x",), categorical=("c",)))
    higher = psi_of(psi_report(reference, small([6.0] * 100, ["a"] * 100), numeric=("x",), categorical=("c",)))

    assert same == {"x": 0.0, "c": 0.0}
    assert higher["x"] > PSI_SIGNIFICANT


def test_numeric_bins_follow_the_reference_deciles():
    reference = small(np.arange(1_000.0), ["a"] * 1_000)
    # Half the current rows in the lowest decile, half in the highest: 0.4 * ln 5 in each of those two bins.
    current = small([0.0] * 50 + [999.0] * 50, ["a"] * 100)

    psi = psi_of(psi_report(reference, current, numeric=("x",), categorical=("c",)))["x"]
    empty_bins = 8 * (1e-4 - 0.1) * np.log(1e-4 / 0.1)
    assert psi == pytest.approx(2 * 0.4 * np.log(5) + empty_bins)


def test_nulls_that_appear_in_current_data_drift():
    reference = small(np.arange(100.0), ["a", "b"] * 50)
    current = small([None] * 50 + list(np.arange(50.0)), ["a", "b"] * 50)

    assert psi_of(psi_report(reference, current, numeric=("x",), categorical=("c",)))["x"] > PSI_SIGNIFICANT


def test_empty_or_incomplete_frames_are_refused(train):
    with pytest.raises(ValueError, match="the current frame has no rows"):
        psi_report(train, train.head(0))
    with pytest.raises(ValueError, match=r"the current frame lacks feature columns \['race'\]"):
        psi_report(train, train.drop("race"))
