from datetime import UTC, datetime

import pytest

from readmission_platform.lib.outcomes import OutcomeFileError, read_outcomes

HEADER = b"encounter_id,readmitted_30d,known_at\n"


def test_a_good_file_reads_each_line_with_its_number():
    read = read_outcomes(HEADER + b'1,1,2026-03-01T08:00:00Z\n"2",false,2026-03-02\n', "outcomes_0001.csv")

    assert read.rows() == [
        ("1", True, datetime(2026, 3, 1, 8, tzinfo=UTC), 2),
        ("2", False, datetime(2026, 3, 2, tzinfo=UTC), 3),
    ]


@pytest.mark.parametrize(
    "data",
    [HEADER + b"1,1,2026-03-01\n\n", HEADER + b"1,1,2026-03-01\n\n\n \n", (HEADER + b"1,1,2026-03-01\n\n").replace(b"\n", b"\r\n")],
)
def test_blank_lines_are_skipped_as_in_batch_files(data):
    assert read_outcomes(data, "outcomes_0001.csv")["line_number"].to_list() == [2]


def test_lines_keep_their_numbers_across_blank_lines():
    read = read_outcomes(HEADER + b"1,1,2026-03-01\n\n2,0,2026-03-01\n", "outcomes_0001.csv")

    assert read["line_number"].to_list() == [2, 4]


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"1,1,2026-03-01\n2,0,2026-03-01,x\n", "1 lines are not rows of the header's 3 fields (line 3 has 4 fields)"),
        (b"1,1,2026-03-01\n2,0\n", "(line 3 has 2 fields)"),
        (b'1,1,2026-03-01\n2,"0,2026-03-01\n3,1,2026-03-01\n', "(line 3 has a quote that does not enclose a whole field)"),
        (b'1,1,2026-03-01\n2,0"x,2026-03-01\n', "(line 3 has a quote that does not enclose a whole field)"),
        (b"1,1,2026-03-01\n2,0,2026-03-01\x00\n", "(line 3 holds a NUL byte)"),
        (
            b"1,1,0001-01-01T00:00:00+01:00\n",
            "column 'known_at' holds 0001-01-01T00:00:00+01:00 on 1 lines (line 2); expected a time within the years 1 to 9999",
        ),
        (b"1,,2026-03-01\n", "column 'readmitted_30d' holds (empty) on 1 lines (line 2)"),
        (b",1,2026-03-01\n", "column 'encounter_id' holds (empty) on 1 lines (line 2); expected an id without spaces"),
    ],
)
def test_a_malformed_line_fails_the_file_naming_the_line(body, message):
    with pytest.raises(OutcomeFileError, match="^outcomes_0002.csv was not loaded: ") as raised:
        read_outcomes(HEADER + body, "outcomes_0002.csv")

    assert message in str(raised.value)


def test_every_problem_of_the_file_is_named_at_once():
    body = b"1,1,2026-03-01,x\n2,yes,2026-03-01\n3,1\n"

    with pytest.raises(OutcomeFileError) as raised:
        read_outcomes(HEADER + body, "outcomes_0002.csv")

    assert str(raised.value) == (
        "outcomes_0002.csv was not loaded: 2 lines are not rows of the header's 3 fields (line 2 has 4 fields, line 4 "
        "has 2 fields); column 'readmitted_30d' holds yes on 1 lines (line 3); expected 0 or 1 (false or true)"
    )


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"encounter_id,encounter_id,readmitted_30d,known_at\n1,1,1,2026-03-01\n", "(repeated ['encounter_id'])"),
        (b'encounter_id,"readmitted_30d,known_at\n1,1,2026-03-01\n', "the header line has a quote"),
        (HEADER + b"\n\n", "has a header and no outcomes"),
    ],
)
def test_a_wrong_header_or_no_outcomes_fails_the_file(data, message):
    with pytest.raises(OutcomeFileError) as raised:
        read_outcomes(data, "outcomes_0002.csv")

    assert message in str(raised.value)


def test_an_empty_request_id_fails_the_file():
    with pytest.raises(OutcomeFileError, match=r"column 'request_id' holds \(empty\) on 1 lines \(line 3\)"):
        read_outcomes(b"request_id,readmitted_30d,known_at\nab12,1,2026-03-01\n,0,2026-03-01\n", "outcomes_0002.csv")
