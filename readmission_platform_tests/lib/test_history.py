"""Point-in-time history: no later encounter reaches an earlier one's features, in training or at serving, and the
service's lookup gives the features training gave, encounter for encounter."""

import numpy as np
import polars as pl
import pytest

from readmission_platform.lib import schema
from readmission_platform.lib.cleaning import clean, clean_record
from readmission_platform.lib.encounter import features_frame, from_clean, typed_frame
from readmission_platform.lib.features import FEATURE_COLUMNS, build_features, record_features
from readmission_platform.lib.history import (
    CONFIRMED_SCHEMA,
    ENCOUNTER,
    HISTORY_FEATURES,
    PATIENT,
    encounter_history,
    keyed_states,
    patient_key,
    patient_keys,
    patient_states,
    states_before,
    with_history,
)
from readmission_platform.lib.history_store import KEY, read_newer, write_states
from readmission_platform.lib.splitting import SPLIT, split_overlap
from readmission_platform.serving.history import PatientHistory
from readmission_platform.serving.prediction_log import engine_for

KEY_BYTES = b"test-history-key"


def raw_rows(*rows: dict) -> pl.DataFrame:
    """Raw encounters (text columns) with the values history reads; the rest left out."""
    base = {"time_in_hospital": "3", "num_medications": "10", "num_lab_procedures": "40", "number_diagnoses": "7",
            "number_inpatient": "0", "readmitted": "NO"}  # fmt: skip
    return pl.DataFrame([base | r for r in rows], schema={name: pl.String for name in (ENCOUNTER, PATIENT, *base)})


def history_of(raw: pl.DataFrame) -> pl.DataFrame:
    features = pl.DataFrame({ENCOUNTER: raw[ENCOUNTER].cast(pl.Int64)}).with_columns(
        raw[c].cast(pl.Float64).alias(c) for c in ("time_in_hospital", "num_medications", "number_diagnoses")
    )
    return pl.concat([features.select(ENCOUNTER), encounter_history(raw, features)], how="horizontal")


def test_history_counts_earlier_encounters_only_in_encounter_id_order():
    # Loaded out of order, and with another patient between: only patient 7's smaller encounter_ids count.
    raw = raw_rows(
        {ENCOUNTER: "30", PATIENT: "7", "time_in_hospital": "5", "num_medications": "20", "readmitted": "<30"},
        {ENCOUNTER: "10", PATIENT: "7", "time_in_hospital": "2", "num_medications": "12", "readmitted": "<30"},
        {ENCOUNTER: "20", PATIENT: "8", "time_in_hospital": "9", "readmitted": "<30"},
        {ENCOUNTER: "25", PATIENT: "7", "time_in_hospital": "4", "num_medications": "15", "readmitted": ">30"},
    )
    by_id = {row[ENCOUNTER]: row for row in history_of(raw).iter_rows(named=True)}

    first, second, third = by_id[10], by_id[25], by_id[30]
    assert first["history_prior_encounters"] == 0 and first["history_prior_inpatient_days"] == 0
    assert (second["history_prior_encounters"], second["history_prior_inpatient_days"]) == (1, 2)
    assert (third["history_prior_encounters"], third["history_prior_inpatient_days"]) == (2, 6)
    # The previous encounter's outcome is a feature of its own (known by this admission); the count holds those before it.
    assert second["history_prior_readmissions_30d"] == 0 and third["history_prior_readmissions_30d"] == 1
    assert (first["history_previous_readmitted_30d"], second["history_previous_readmitted_30d"]) == (0, 1)
    assert third["history_previous_readmitted_30d"] == 0  # encounter 25 came back after 30 days
    assert (third["history_previous_num_medications"], third["history_change_num_medications"]) == (15, 5)
    assert (second["history_previous_time_in_hospital"], second["history_change_time_in_hospital"]) == (2, 2)
    assert by_id[20]["history_prior_encounters"] == 0  # patient 8's first


def test_raw_values_are_read_as_cleaning_reads_them():
    # Padded ids and values, a label with spaces, and a value that is not a number (as in a batch cleaning refused).
    raw = raw_rows(
        {ENCOUNTER: " 10", PATIENT: "7 ", "time_in_hospital": " 2 ", "readmitted": " <30 "},
        {ENCOUNTER: "20", PATIENT: " 7", "time_in_hospital": "?", "num_medications": "many"},
        {ENCOUNTER: "30", PATIENT: "7", "time_in_hospital": "4"},
    )
    by_id = {row[ENCOUNTER]: row for row in states_before(raw).iter_rows(named=True)}

    assert (by_id[20]["encounters"], by_id[20]["inpatient_days"], by_id[20]["latest_readmitted_30d"]) == (1, 2, 1)
    assert (by_id[30]["encounters"], by_id[30]["inpatient_days"], by_id[30]["readmissions_30d"]) == (2, 2, 1)
    assert by_id[30]["latest_num_medications"] == 0  # unknown, as without a state
    assert patient_states(raw).row(0, named=True)["encounters"] == 3


def test_the_state_serving_stores_is_the_history_of_a_next_encounter():
    raw = raw_rows(
        {ENCOUNTER: "1", PATIENT: "7", "readmitted": "<30"},
        {ENCOUNTER: "2", PATIENT: "7", "readmitted": "<30", "num_medications": "14"},
    )
    following = raw_rows(*raw.to_dicts(), {ENCOUNTER: "3", PATIENT: "7"})

    (state,) = patient_states(raw).drop(PATIENT).to_dicts()
    expected = states_before(following).filter(pl.col(ENCOUNTER) == 3).drop(ENCOUNTER).row(0, named=True)
    assert state == expected
    assert (state["encounters"], state["readmissions_30d"], state["latest_num_medications"]) == (2, 1, 14)


def confirmed_rows(*rows: dict) -> pl.DataFrame:
    """Encounters the service scored for a named patient whose outcome came back (`CONFIRMED_SCHEMA`)."""
    base = {"time_in_hospital": 3, "num_medications": 10, "num_lab_procedures": 40, "number_diagnoses": 7, "number_inpatient": 0}
    return pl.DataFrame([base | r for r in rows]).with_columns(
        pl.col("predicted_at").str.to_datetime(time_zone="UTC")
    ).select(list(CONFIRMED_SCHEMA)).cast(CONFIRMED_SCHEMA)


def test_an_encounter_whose_outcome_came_back_counts_as_if_it_had_been_loaded():
    raw = raw_rows(
        {ENCOUNTER: "1", PATIENT: "7", "readmitted": "<30"},
        {ENCOUNTER: "2", PATIENT: "7", "readmitted": "<30", "num_medications": "14"},
        {ENCOUNTER: "5", PATIENT: "8"},
    )
    seven, nine = patient_key("7", KEY_BYTES), patient_key("9", KEY_BYTES)
    confirmed = confirmed_rows(
        # Predicted for patient 7 after both loaded encounters, in this order (listed out of it).
        {"request_id": "b", KEY: seven, "predicted_at": "2026-03-02T00:00:00", "num_medications": 30, "readmitted_30d": False},
        {"request_id": "a", KEY: seven, "predicted_at": "2026-03-01T00:00:00", "time_in_hospital": 6, "readmitted_30d": True},
        {"request_id": "z", KEY: nine, "predicted_at": "2026-03-01T00:00:00", "readmitted_30d": True},  # no loaded encounter
        {"request_id": "5", KEY: patient_key("8", KEY_BYTES), "predicted_at": "2026-03-01T00:00:00", "readmitted_30d": True},
    )
    # The same encounters as raw rows past every loaded one: the states must be those patient_states gives them.
    as_loaded = raw_rows(
        *raw.to_dicts(),
        {ENCOUNTER: "100", PATIENT: "7", "time_in_hospital": "6", "readmitted": "<30"},
        {ENCOUNTER: "101", PATIENT: "7", "num_medications": "30", "readmitted": "NO"},
        {ENCOUNTER: "102", PATIENT: "9", "readmitted": "<30"},
    )
    expected = patient_states(as_loaded).with_columns(pl.Series(KEY, patient_keys(patient_states(as_loaded)[PATIENT], KEY_BYTES)))
    found = keyed_states(raw, confirmed, KEY_BYTES)
    assert found.sort(KEY).equals(expected.drop(PATIENT).select(found.columns).sort(KEY))
    by_key = {row[KEY]: row for row in found.iter_rows(named=True)}
    # Patient 7: encounter 2's readmission now counts (another encounter followed it); "a"'s counts once one follows "b".
    assert (by_key[seven]["encounters"], by_key[seven]["readmissions_30d"], by_key[seven]["latest_num_medications"]) == (4, 3, 30)
    assert by_key[nine]["encounters"] == 1 and by_key[nine]["latest_readmitted_30d"] == 1
    # Request "5" is the loaded encounter 5 (the client sent its encounter_id as request_id): counted once.
    assert by_key[patient_key("8", KEY_BYTES)]["encounters"] == 1
    alone = keyed_states(raw, confirmed.clear(), KEY_BYTES)
    loaded = patient_states(raw).with_columns(pl.Series(KEY, patient_keys(patient_states(raw)[PATIENT], KEY_BYTES)))
    assert alone.sort(KEY).equals(loaded.select(alone.columns).sort(KEY))
    with pytest.raises(ValueError, match="lack the columns"):
        keyed_states(raw, confirmed.drop("readmitted_30d"), KEY_BYTES)


def test_a_request_numbered_as_another_patients_loaded_encounter_still_counts():
    raw = raw_rows({ENCOUNTER: "1", PATIENT: "7"}, {ENCOUNTER: "2", PATIENT: "8"})
    nine = patient_key("9", KEY_BYTES)
    confirmed = confirmed_rows(  # the client numbers its requests; "1" is also patient 7's encounter 1
        {"request_id": "1", KEY: nine, "predicted_at": "2026-03-01T00:00:00", "readmitted_30d": True},
        {"request_id": "2", KEY: patient_key("8", KEY_BYTES), "predicted_at": "2026-03-01T00:00:00", "readmitted_30d": True},
    )
    by_key = {row[KEY]: row for row in keyed_states(raw, confirmed, KEY_BYTES).iter_rows(named=True)}
    assert by_key[nine]["encounters"] == 1 and by_key[nine]["latest_readmitted_30d"] == 1
    assert by_key[patient_key("8", KEY_BYTES)]["encounters"] == 1  # patient 8's own encounter 2: counted once
    assert by_key[patient_key("7", KEY_BYTES)]["encounters"] == 1


def test_no_identifier_label_or_later_encounter_count_is_a_feature():
    forbidden = {*schema.IDENTIFIERS, schema.LABEL, schema.LABEL_30D, schema.BATCH_ID, "split"}
    assert forbidden.isdisjoint(FEATURE_COLUMNS)
    assert set(HISTORY_FEATURES) <= set(FEATURE_COLUMNS)
    assert all(name.startswith(("history_prior_", "history_previous_", "history_change_")) for name in HISTORY_FEATURES)


@pytest.fixture(scope="module")
def full_history(full_raw, full_clean):
    return with_history(build_features(full_clean.frame), full_raw)


@pytest.mark.parametrize("change", ["values and outcomes", "deleted", "added"])
def test_changing_or_deleting_later_encounters_never_changes_an_earlier_encounters_history(full_raw, full_history, change):
    """Each patient with several encounters is cut at a random one of them; everything after the cut is altered.
    Every encounter up to the cut keeps its features to the bit; the encounters after it do change (the test sees)."""
    rng = np.random.default_rng(17)
    ids = full_raw.select(pl.col(ENCOUNTER).cast(pl.Int64), pl.col(PATIENT).cast(pl.Int64)).sort(ENCOUNTER)
    ranked = ids.with_columns(pl.int_range(pl.len()).over(PATIENT).alias("rank"), pl.len().over(PATIENT).alias("n"))
    several = ranked.filter(pl.col("n") > 1).select(PATIENT, "n").unique()
    cuts = several.with_columns(pl.Series("cut", rng.integers(0, several["n"].to_numpy() - 1)))
    later = ranked.join(cuts, on=PATIENT).filter(pl.col("rank") > pl.col("cut"))[ENCOUNTER]
    is_later = pl.col(ENCOUNTER).cast(pl.Int64).is_in(later.implode())
    if change == "values and outcomes":
        altered = full_raw.with_columns(
            *(pl.when(is_later).then(pl.lit("1")).otherwise(pl.col(c)).alias(c)
              for c in ("time_in_hospital", "num_medications", "num_lab_procedures", "number_diagnoses", "number_inpatient")),
            pl.when(is_later).then(pl.lit("<30")).otherwise(pl.col("readmitted")).alias("readmitted"),
        )  # fmt: skip
    elif change == "deleted":
        altered = full_raw.filter(~is_later)
    else:  # a later encounter of every patient, past every id
        extra = full_raw.group_by(PATIENT).first().with_columns(
            (pl.int_range(pl.len()) + 10**9).cast(pl.String).alias(ENCOUNTER), pl.lit("<30").alias("readmitted")
        )
        altered = pl.concat([full_raw, extra.select(full_raw.columns)])
        later = pl.Series(dtype=pl.Int64)
    before = full_history.filter(~pl.col(ENCOUNTER).is_in(later.implode()))
    kept_features = before.select(ENCOUNTER, *FEATURE_COLUMNS)
    after = with_history(build_features(clean(altered).frame), altered)
    assert after.join(kept_features.select(ENCOUNTER), on=ENCOUNTER).select(ENCOUNTER, *FEATURE_COLUMNS).sort(ENCOUNTER).equals(
        kept_features.sort(ENCOUNTER)
    )
    if change == "values and outcomes":  # the altered rows' own history moved: the comparison above could fail
        moved = after.join(full_history, on=ENCOUNTER, suffix="_was").filter(
            pl.col("history_prior_inpatient_days") != pl.col("history_prior_inpatient_days_was")
        )
        assert moved.height > 1_000


def test_history_keeps_the_patient_split(full_features):
    assert split_overlap(full_features)["patients_in_several_splits"] == 0
    assert full_features.select(HISTORY_FEATURES).null_count().sum_horizontal().item() == 0
    # About 30 % of encounters have an earlier one.
    assert 0.25 < (full_features["history_prior_encounters"] > 0).mean() < 0.40


@pytest.mark.postgres
def test_states_are_stored_and_read_back_on_postgresql(new_pg_database, full_raw):
    url = new_pg_database("history")
    engine = engine_for(url)
    assert read_newer(url, None) == (None, None)
    states = patient_states(full_raw.head(2_000))
    keyed = states.with_columns(pl.Series(KEY, patient_keys(states[PATIENT], KEY_BYTES))).drop(PATIENT)
    assert write_states(engine, keyed) == 1 and write_states(engine, keyed) == 2
    version, stored = read_newer(url, None)
    assert version == 2 and stored.sort(KEY).equals(keyed.select(stored.columns).sort(KEY))
    assert read_newer(url, 2) == (2, None)  # the version held: the states are not read again
    engine.dispose()


def test_a_stored_state_names_no_patient_and_replaces_the_last_in_one_version(tmp_path, full_raw):
    url = f"sqlite:///{tmp_path / 'log.sqlite'}"
    engine = engine_for(url)
    states = patient_states(full_raw.head(500))
    keyed = states.with_columns(pl.Series(KEY, patient_keys(states[PATIENT], KEY_BYTES))).drop(PATIENT)
    assert write_states(engine, keyed) == 1
    assert write_states(engine, keyed.head(10)) == 2
    engine.dispose()  # read through ADBC's SQLite, as the service does: one copy of SQLite at a time on a file
    version, stored = read_newer(url, None)
    assert version == 2 and stored.height == 10
    held = (tmp_path / "log.sqlite").read_bytes() + b"".join(p.read_bytes() for p in tmp_path.glob("log.sqlite-*"))
    assert not any(f"{n}".encode() in held for n in states[PATIENT].head(10))
    with pytest.raises(ValueError, match="one row per patient_key"):
        write_states(engine, pl.concat([keyed.head(2), keyed.head(1)]))
    engine.dispose()
    assert read_newer(url, None)[1].height == 10  # a refused write leaves the stored states as they were


def test_serving_history_equals_training_history_on_the_whole_test_set(tmp_path, full_raw, full_clean, full_features):
    """Each test encounter is served as its patient's next encounter, with the state the pipeline would have stored
    from the encounters before it (written to a real SQLite store, read by the service's `PatientHistory`). Its
    features, by the batch path and the single-encounter path, equal the training set's row for it."""
    url = f"sqlite:///{tmp_path / 'log.sqlite'}"
    engine = engine_for(url)
    history = PatientHistory(url, KEY_BYTES)
    test = full_features.filter(pl.col(SPLIT) == "test")
    raw = full_raw.with_columns(pl.col(ENCOUNTER).cast(pl.Int64).alias("_id"), pl.col(PATIENT).cast(pl.Int64).alias("_p"))
    ranks = raw.select("_id", "_p", pl.int_range(pl.len()).over("_p", order_by="_id").alias("rank"))
    test = test.join(ranks.rename({"_id": ENCOUNTER}).drop("_p"), on=ENCOUNTER)
    clean_rows = full_clean.frame.select(ENCOUNTER, *(c for c in full_clean.frame.columns if c != ENCOUNTER))
    compared = 0
    for rank in range(int(test["rank"].max()) + 1):
        served = test.filter(pl.col("rank") == rank)
        if served.is_empty():
            continue
        # The pipeline has loaded each of these patients' encounters before this one, and no other.
        earlier = raw.join(ranks.filter(pl.col("rank") < rank), on=["_id", "_p"], how="semi").drop("_id", "_p")
        earlier = earlier.filter(pl.col(PATIENT).cast(pl.Int64).is_in(served[PATIENT].implode()))
        states = patient_states(earlier)
        write_states(engine, states.with_columns(pl.Series(KEY, patient_keys(states[PATIENT], KEY_BYTES))).drop(PATIENT))
        engine.dispose()  # the pipeline writes in a process of its own
        history.refresh()
        requests = served.select(ENCOUNTER, PATIENT).join(clean_rows, on=ENCOUNTER, how="left", maintain_order="left")
        typed = typed_frame([from_clean(r) for r in requests.iter_rows(named=True)])
        found, used, _ = history.states(served[PATIENT].cast(pl.String))
        assert used.all()
        assert features_frame(typed, found).equals(served.select(FEATURE_COLUMNS)), f"rank {rank}"
        for row, expected in zip(requests.head(50).iter_rows(named=True), served.head(50).select(FEATURE_COLUMNS).iter_rows(named=True)):
            single = record_features(clean_record(from_clean(row)), history.state(str(row[PATIENT])))
            assert single == expected
        compared += served.height
    assert compared == test.height > 14_000


def test_without_an_identifier_or_a_key_no_history_is_used(tmp_path):
    url = f"sqlite:///{tmp_path / 'log.sqlite'}"
    engine = engine_for(url)
    write_states(engine, pl.DataFrame({KEY: [patient_key("p1", KEY_BYTES)]}).with_columns(
        *(pl.lit(1, pl.Int64).alias(n) for n in ("encounters", "inpatient_days", "readmissions_30d", "latest_readmitted_30d",
                                                 "latest_time_in_hospital", "latest_num_medications", "latest_num_lab_procedures",
                                                 "latest_number_diagnoses", "latest_number_inpatient"))
    ))  # fmt: skip
    engine.dispose()
    keyed, keyless = PatientHistory(url, KEY_BYTES), PatientHistory(url, None)
    keyed.refresh(), keyless.refresh()
    assert keyed.state("p1")["encounters"] == 1 and keyed.state("someone new")["encounters"] == 0
    assert keyed.state(None) is None and keyless.state("p1") is None
    states, used, keys = keyed.states(pl.Series([None, "p1", "someone new"], dtype=pl.String))
    assert used.to_list() == [False, True, True]
    assert states["encounters"].to_list() == [None, 1, 0]
    # What the prediction log keeps: the keyed hash, never the identifier.
    assert keys.to_list() == [None, patient_key("p1", KEY_BYTES), patient_key("someone new", KEY_BYTES)]
    assert keyed.lookup("p1") == (patient_key("p1", KEY_BYTES), keyed.state("p1")) and keyed.lookup(None) == (None, None)
    assert keyless.states(pl.Series(["p1"]))[1].to_list() == [False] and keyless.states(pl.Series(["p1"]))[2] is None
    assert keyless.lookup("p1") == (None, None)
    assert keyed.states(pl.Series([None], dtype=pl.String))[0] is None
