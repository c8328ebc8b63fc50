import polars as pl

from readmission_platform.lib.reporting import examples, markdown_table


def test_markdown_table_shows_the_first_rows_and_counts_the_rest():
    frame = pl.DataFrame({"encounter_id": [1, 2, 3], "race": ["Caucasian", None, "Asian"]})

    assert markdown_table(frame, limit=2) == (
        "| encounter_id | race |\n|---|---|\n| 1 | Caucasian |\n| 2 |  |\n\n… 1 more rows"
    )
    assert markdown_table(frame).endswith("| 3 | Asian |")


def test_examples_list_a_few_and_count_the_others():
    assert examples([]) == ""
    assert examples(["a", "b"]) == "a, b"
    assert examples(range(8), limit=3) == "0, 1, 2 … (+5 more)"


def test_masked_hides_the_password_of_a_url():
    from readmission_platform.lib.reporting import masked

    assert masked("postgresql://reader:s3cret@db.example:5432/wh") == "postgresql://***@db.example:5432/wh"
    assert masked("duckdb:////tmp/warehouse.duckdb") == "duckdb:////tmp/warehouse.duckdb"
