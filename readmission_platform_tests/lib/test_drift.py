import numpy as np
import polars as pl
import pytest

from readmission_platform.lib import schema
from readmission_platform.lib.cleaning import clean
from readmission_platform.lib.drift import PSI_MODERATE, PSI_SIGNIFICANT, psi_report, serving_psi
from readmission_platform.lib.encounter import REQUEST_DTYPES
from readmission_platform.lib.features import ENCOUNTER_FEATURES, build_features
from readmission_platform.lib.ingest import parse_batch
from readmission_platform.lib.landing import split_batches
from readmission_platform.lib.splitting import SPLIT, assign_split
from readmission_platform_tests.conftest import INGESTED_AT


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

    assert sorted(report["feature"]) == sorted(ENCOUNTER_FEATURES)
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


@pytest.fixture(scope="module")
def bundled_clean(full_source_bytes) -> list[pl.DataFrame]:
    """The clean rows of the 7 batches `readmission land` cuts from the bundled file, in its time order."""
    nothing = pl.DataFrame(schema={"encounter_id": pl.Int64, schema.BATCH_ID: pl.String})
    return [
        clean(parse_batch(data, batch_id=f"batch_{i:04d}", source_file="f.csv", loaded_elsewhere=nothing, now=INGESTED_AT).rows).frame
        for i, data in enumerate(split_batches(full_source_bytes), start=1)
    ]


@pytest.fixture(scope="module")
def bundled_batches(bundled_clean) -> list[pl.DataFrame]:
    """The features of those batches."""
    return [build_features(frame) for frame in bundled_clean]


def training_rows(batch: pl.DataFrame) -> pl.DataFrame:
    return assign_split(batch).filter(pl.col(SPLIT) == "train")


def test_the_bundled_files_steady_batches_do_not_drift_from_the_batch_before(bundled_batches):
    for before, batch in zip(bundled_batches[3:], bundled_batches[4:], strict=False):
        report = psi_report(training_rows(before), batch)

        assert report["psi"].max() < PSI_SIGNIFICANT, report.head(3)


def test_against_all_earlier_training_rows_every_batch_drifts_on_how_payers_were_recorded(bundled_batches):
    for k in range(4, 7):
        report = psi_report(training_rows(pl.concat(bundled_batches[:k])), bundled_batches[k])

        assert report.row(0, named=True)["feature"] == "payer_code" and report["psi"].max() >= PSI_SIGNIFICANT


def test_the_years_payer_codes_began_to_be_recorded_drift(bundled_batches):
    for before, batch in zip(bundled_batches[:2], bundled_batches[1:3], strict=False):
        report = psi_report(training_rows(before), batch)

        assert report.row(0, named=True)["feature"] == "payer_code" and report["psi"].max() >= PSI_SIGNIFICANT


def test_a_planted_shift_in_an_ordinary_batch_drifts_and_only_there(bundled_batches):
    before, batch = bundled_batches[5], bundled_batches[6]
    # The lab's HbA1c results stop reaching the hospital's records.
    planted = batch.with_columns(pl.lit("not measured").alias("A1Cresult"))

    report = psi_report(training_rows(before), planted)

    assert report.row(0, named=True)["feature"] == "A1Cresult"
    assert report["psi"][0] >= PSI_SIGNIFICANT > report["psi"][1]


# A stand-in for a model's probability: rises with the encounter's earlier inpatient stays.
PROBABILITY = (1 / (1 + (2 - 0.5 * pl.col("number_inpatient")).exp())).alias("probability")


def logged(clean_rows: pl.DataFrame, version: str) -> pl.DataFrame:
    """Clean encounters as the prediction log holds them: the fields as sent, typed, with the version and probability."""
    fields = clean_rows.select(pl.col(name).cast(dtype) for name, dtype in REQUEST_DTYPES.items())
    return pl.concat([fields.with_columns(pl.lit(version).alias("model_version")), build_features(clean_rows).select(PROBABILITY)], how="horizontal")


def test_serving_drift_names_the_planted_movers_of_one_version_and_leaves_the_other_alone(bundled_clean, bundled_batches):
    reference = training_rows(bundled_batches[5]).with_columns(PROBABILITY)
    served = bundled_clean[6]
    planted = logged(served, "4").with_columns(pl.col("num_lab_procedures") + 20, pl.col("probability").sqrt())
    predictions = pl.concat([logged(served, "3"), planted])

    report = serving_psi(predictions, reference)

    steady, shifted = (report.filter(pl.col("model_version") == v) for v in ("3", "4"))
    assert steady.height == shifted.height == len(ENCOUNTER_FEATURES) + 1 and set(report["rows"]) == {served.height}
    assert steady["psi"].max() < PSI_SIGNIFICANT, steady.head(3)
    assert set(shifted.head(2)["feature"]) == {"num_lab_procedures", "probability"}
    assert shifted["psi"][1] >= PSI_SIGNIFICANT > shifted["psi"][2]


def test_served_encounters_of_the_training_rows_themselves_do_not_drift(bundled_clean, bundled_batches):
    rows = bundled_clean[6].filter(pl.col("patient_nbr").is_in(training_rows(bundled_batches[6])["patient_nbr"].implode()))

    report = serving_psi(logged(rows, "1"), training_rows(bundled_batches[6]).with_columns(PROBABILITY))

    assert report["psi"].abs().max() < 1e-12


def test_serving_drift_refuses_predictions_without_version_or_probability(bundled_clean, train):
    with pytest.raises(ValueError, match=r"the predictions frame lacks feature columns \['probability'\]"):
        serving_psi(logged(bundled_clean[6], "1").drop("probability"), train.with_columns(PROBABILITY))
