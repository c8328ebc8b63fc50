import polars as pl
import pytest

from readmission_platform.lib import schema
from readmission_platform.lib.validation import clean_violations, shape_problems


@pytest.fixture(scope="module")
def valid(full_clean) -> pl.DataFrame:
    return full_clean.frame.head(200)


def with_values(frame: pl.DataFrame, column: str, values: dict[int, object]) -> pl.DataFrame:
    """`frame` with `column` set to `values[i]` in row i."""
    series = frame[column].to_list()
    for i, value in values.items():
        series[i] = value
    return frame.with_columns(pl.Series(column, series, dtype=frame.schema[column]))


def test_full_clean_data_breaks_no_rule(full_clean):
    assert clean_violations(full_clean.frame) == []


@pytest.mark.parametrize(
    ("column", "value", "shown", "expected"),
    [
        ("age", "[100-110)", "'[100-110)'", "one of [0-10), [10-20)"),
        ("race", "Martian", "'Martian'", "one of Caucasian, AfricanAmerican"),
        ("admission_source_id", 16, "16", "one of 1, 2,"),
        ("time_in_hospital", 15, "15", "an integer from 1 to 14"),
        ("number_diagnoses", 0, "0", "an integer from 1 to 50"),
        ("age_years", 105, "105", "an integer from 5 to 95"),
        ("diag_1", "X12", "'X12'", "text matching ^("),
        ("diag_2", "250.831", "'250.831'", "text matching ^("),
        ("payer_code", "mc", "'mc'", "text matching ^[A-Z]{2}$"),
        ("diag_3_group", "cardiac", "'cardiac'", "one of circulatory"),
    ],
)
def test_value_outside_the_schema_is_named_with_its_column(valid, column, value, shown, expected):
    frame = with_values(valid, column, {3: value, 7: value})

    [violation] = clean_violations(frame)

    assert (violation.column, violation.rows) == (column, 2)
    assert violation.message.startswith(f"column '{column}' holds {shown} in 2 rows (encounter_id ")
    assert f"{frame['encounter_id'][3]}, {frame['encounter_id'][7]}" in violation.message
    assert f"; expected {expected}" in violation.message


@pytest.mark.parametrize("column", ["gender", "encounter_id", "time_in_hospital", "A1Cresult", schema.LABEL_30D])
def test_null_in_a_required_column_is_named(valid, column):
    [violation] = clean_violations(with_values(valid, column, {5: None}))

    assert (violation.column, violation.rows) == (column, 1)
    assert violation.message.startswith(f"column '{column}' is empty or unreadable in 1 rows")


@pytest.mark.parametrize("column", ["race", "weight", "payer_code", "medical_specialty", "diag_3", "diag_3_group"])
def test_null_in_a_nullable_column_is_allowed(valid, column):
    assert clean_violations(with_values(valid, column, {5: None})) == []


def test_missing_column_is_named(valid):
    assert [(v.column, v.message) for v in clean_violations(valid.drop("insulin"))] == [
        ("insulin", "column 'insulin' is missing")
    ]


def test_several_problems_are_all_reported(valid):
    frame = with_values(with_values(valid, "age", {0: "[100-110)"}), "diag_1", {1: "Q1"})
    assert [v.column for v in clean_violations(frame)] == ["age", "diag_1"]


def test_examples_are_capped(valid):
    frame = with_values(valid, "race", {i: f"Race{i}" for i in range(8)})
    [violation] = clean_violations(frame)
    assert "'Race0', 'Race1', 'Race2', 'Race3', 'Race4' … (+3 more) in 8 rows" in violation.message


def test_shape_as_declared_has_no_problem(valid):
    assert shape_problems("clean_batches", schema.CLEAN_SCHEMA, valid, "b1") == []


@pytest.mark.parametrize(
    "change, expected",
    [
        (lambda f: f.drop("age"), "clean_batches columns differ from the declared ones: missing ['age'], unexpected []"),
        (
            lambda f: f.with_columns(extra=pl.lit(1)),
            "clean_batches columns differ from the declared ones: missing [], unexpected ['extra']",
        ),
        (
            lambda f: f.with_columns(pl.col("time_in_hospital").cast(pl.Float64)),
            "clean_batches columns have other types than declared: time_in_hospital Float64 (declared Int",
        ),
        (lambda f: f.select(reversed(f.columns)), "clean_batches columns are in another order than declared: ["),
        (lambda f: f.clear(), "batch b1 has no rows in clean_batches"),
    ],
    ids=["missing", "unexpected", "retyped", "reordered", "empty"],
)
def test_shape_problem_is_named(valid, change, expected):
    (problem,) = shape_problems("clean_batches", schema.CLEAN_SCHEMA, change(valid), "b1")
    assert problem.startswith(expected)
