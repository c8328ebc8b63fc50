"""Point-in-time patient history: features of an encounter from the same patient's earlier encounters only.

Time order. The data set has no dates; `encounter_id` order is taken as time order. It is close to it: across the
30,248 consecutive pairs of one patient's encounters the age bracket rises 1,567 times and falls 18 times. "Earlier"
means a smaller `encounter_id` of the same `patient_nbr`, among every encounter loaded into raw_batches (those cleaning
drops, deaths and hospice among them, were still stays the hospital knew of).

What is known at an encounter's admission:
- how many earlier encounters the patient had, and their days in hospital;
- the previous encounter's values, and the change from them to this one;
- the 30-day outcome of every earlier encounter, the immediately previous one included: at this admission the
  previous encounter's 30-day window has either closed, or this very admission falls inside it (and then its outcome
  is this readmission). So the previous outcome is a feature of its own (`history_previous_readmitted_30d`), the
  count of readmissions over the ones before it another. At serving, an encounter the service scored counts once its
  outcome has come back (`keyed_states`): a patient who returns before that has it missing from their history.
Nothing of a later encounter ever is: no total per patient, no "has a next encounter" (those reach ROC-AUC
0.79-0.82 on this data set: a leak).

One definition serves training and serving. A patient's history before an encounter is a `STATE` (counts and the
latest encounter's values); `states_before` gives it for every encounter of a table, `patient_states` for the next
encounter of every patient, `keyed_states` the same with the encounters whose outcome came back from the service's
predictions (what serving stores), and `history_values` turns states and the encounter's own values
into the `HISTORY_FEATURES` (`history_expressions`, `record_history`). Without a state (no patient identifier in a request) the features are those of a first
encounter, which is what 70 % of training encounters are, and the answer says that no history was used.

What it is worth, measured by `benchmarks/history_gain.py` on the platform's split: README.md, Patient history.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Collection, Iterable, Mapping
from typing import Any

import polars as pl

from readmission_platform.lib import schema
from readmission_platform.lib.cleaning import raw_value

ENCOUNTER, PATIENT = schema.IDENTIFIERS
# The previous encounter's values kept, and those whose change to this encounter is a feature.
PREVIOUS = ("time_in_hospital", "num_medications", "num_lab_procedures", "number_diagnoses", "number_inpatient")
CHANGED = ("time_in_hospital", "num_medications", "number_diagnoses")

# A patient's history before an encounter: counts over the earlier encounters and the latest one's values.
STATE_SCHEMA: dict[str, pl.DataType] = {
    "encounters": pl.Int64(),
    "inpatient_days": pl.Int64(),
    "readmissions_30d": pl.Int64(),  # earlier encounters but the latest one readmitted within 30 days
    "latest_readmitted_30d": pl.Int64(),  # the latest one's outcome: its own feature, then counted once another follows
    **{f"latest_{name}": pl.Int64() for name in PREVIOUS},
}
STATE = tuple(STATE_SCHEMA)
NO_STATE = dict.fromkeys(STATE, 0)  # before a patient's first encounter

KEY = "patient_key"  # the keyed hash that stands for a patient wherever one is kept (`patient_key`)
# An encounter the service scored for a named patient, whose outcome came back (`keyed_states`).
CONFIRMED_SCHEMA: dict[str, pl.DataType] = {
    "request_id": pl.String(), KEY: pl.String(), "predicted_at": pl.Datetime("us", "UTC"),
    **{name: pl.Int64() for name in dict.fromkeys(("time_in_hospital", *PREVIOUS))}, "readmitted_30d": pl.Boolean(),
}  # fmt: skip

HISTORY_FEATURES = (
    "history_prior_encounters",
    "history_prior_inpatient_days",
    "history_prior_readmissions_30d",
    "history_previous_readmitted_30d",
    *(f"history_previous_{name}" for name in PREVIOUS),
    *(f"history_change_{name}" for name in CHANGED),
)


def _encounters(raw: pl.DataFrame | pl.LazyFrame) -> pl.LazyFrame:
    """Raw rows (text columns) → identifiers, the values history reads, and the 30-day outcome as 0/1. Values are read
    as cleaning reads them (`raw_value`); one that is missing or not a number counts as 0, as no state does: a raw
    row whose batch cleaning refused still is an encounter the hospital had."""
    return raw.lazy().select(
        raw_value(ENCOUNTER).cast(pl.Int64),
        raw_value(PATIENT).cast(pl.Int64),
        *(raw_value(name).cast(pl.Int64).fill_null(0) for name in dict.fromkeys(("time_in_hospital", *PREVIOUS))),
        (raw_value(schema.LABEL) == schema.READMITTED_WITHIN_30_DAYS).cast(pl.Int64).fill_null(0).alias("readmitted_30d_now"),
    )


def _states(encounters: pl.LazyFrame) -> pl.LazyFrame:
    """Each row's patient state before it: sums over the patient's rows before it, the previous row's values."""
    earlier = {"partition_by": PATIENT, "order_by": ENCOUNTER}
    return encounters.with_columns(
        pl.int_range(pl.len()).over(**earlier).alias("encounters"),
        pl.col("time_in_hospital").cum_sum().shift(1, fill_value=0).over(**earlier).alias("inpatient_days"),
        pl.col("readmitted_30d_now").cum_sum().shift(2, fill_value=0).over(**earlier).alias("readmissions_30d"),
        pl.col("readmitted_30d_now").shift(1, fill_value=0).over(**earlier).alias("latest_readmitted_30d"),
        *(pl.col(name).shift(1, fill_value=0).over(**earlier).alias(f"latest_{name}") for name in PREVIOUS),
    )


def states_before(raw: pl.DataFrame) -> pl.DataFrame:
    """Every raw encounter → `encounter_id` and its patient's `STATE` before it (from that patient's rows with a
    smaller `encounter_id` only)."""
    return _states(_encounters(raw)).select(ENCOUNTER, *STATE).collect()


def _next_states(encounters: pl.LazyFrame) -> pl.LazyFrame:
    """Every patient of `encounters` (`_encounters`' columns) → the patient column and the `STATE` a next encounter of
    theirs would have: one is appended past each patient's last, and its state read by the rule of `states_before`."""
    after = encounters.group_by(PATIENT).agg(pl.col(ENCOUNTER).max() + 1).with_columns(
        *(pl.lit(None, pl.Int64).alias(name) for name in dict.fromkeys(("time_in_hospital", *PREVIOUS))),
        pl.lit(0, pl.Int64).alias("readmitted_30d_now"),
    )
    both = pl.concat([encounters, after.select(encounters.collect_schema().names())])
    return _states(both.with_columns(pl.col("time_in_hospital").fill_null(0))).join(
        after.select(PATIENT, ENCOUNTER), on=[PATIENT, ENCOUNTER]
    ).select(PATIENT, *STATE).sort(PATIENT)


def patient_states(raw: pl.DataFrame) -> pl.DataFrame:
    """Every patient of the raw encounters → `patient_nbr` and the `STATE` a next encounter of theirs would have, by
    the same rule as `states_before`, so serving and training cannot define history twice."""
    return _next_states(_encounters(raw)).collect()


def keyed_states(raw: pl.DataFrame, confirmed: pl.DataFrame, key: bytes) -> pl.DataFrame:
    """Every patient → `KEY` (`patient_key` of `patient_nbr`) and the `STATE` a next encounter of theirs would have,
    from the raw encounters and the `confirmed` ones (`CONFIRMED_SCHEMA`).

    A confirmed encounter is one the service scored for a patient named in the request and whose 30-day outcome has
    come back: it happened, and what it was is known. It is taken as later than every raw encounter (it was scored
    after the batches were loaded), confirmed ones in the order they were predicted, and counted by the same rule as
    a raw one: it becomes the latest encounter, so the patient's previous latest one now counts among the earlier
    outcomes, and its own outcome counts once another encounter follows it, as in training. One whose `request_id` is
    the `encounter_id` of a raw encounter of the same patient is that encounter, already counted (another patient's
    encounter of that id is a coincidence of numbering, not the same stay).
    """
    if missing := [name for name in CONFIRMED_SCHEMA if name not in confirmed.columns]:
        raise ValueError(f"confirmed encounters lack the columns {missing}; expected {list(CONFIRMED_SCHEMA)}")
    encounters = _encounters(raw).collect()
    patients = encounters[PATIENT].unique()
    keys = pl.DataFrame({PATIENT: patients, KEY: patient_keys(patients, key)}, schema={PATIENT: pl.Int64, KEY: pl.String})
    loaded = encounters.join(keys, on=PATIENT).drop(PATIENT).rename({KEY: PATIENT})
    known = loaded.select(pl.col(ENCOUNTER).cast(pl.String).alias("request_id"), pl.col(PATIENT).alias(KEY))
    later = (
        confirmed.join(known, on=["request_id", KEY], how="anti")  # a loaded encounter of the same patient: counted
        .sort("predicted_at", "request_id")
        .select(
            (pl.int_range(pl.len(), dtype=pl.Int64) + (encounters[ENCOUNTER].max() or 0) + 1).alias(ENCOUNTER),
            pl.col(KEY).alias(PATIENT),
            *(pl.col(name).cast(pl.Int64) for name in dict.fromkeys(("time_in_hospital", *PREVIOUS))),
            pl.col("readmitted_30d").cast(pl.Int64).alias("readmitted_30d_now"),
        )
    )
    both = pl.concat([loaded, later.select(loaded.columns)])
    return _next_states(both.lazy()).rename({PATIENT: KEY}).collect()


def history_expressions(columns: Collection[str]) -> list[pl.Expr]:
    """The `HISTORY_FEATURES`, as floats, of rows holding the encounter's own numeric features and its patient's
    `STATE` (a null, or a state column not among `columns`: none known, as before a first encounter)."""
    state = {name: pl.col(name).fill_null(value) if name in columns else pl.lit(value, pl.Int64) for name, value in NO_STATE.items()}
    seen = state["encounters"] > 0
    return [
        state["encounters"].cast(pl.Float64).alias("history_prior_encounters"),
        state["inpatient_days"].cast(pl.Float64).alias("history_prior_inpatient_days"),
        state["readmissions_30d"].cast(pl.Float64).alias("history_prior_readmissions_30d"),
        state["latest_readmitted_30d"].cast(pl.Float64).alias("history_previous_readmitted_30d"),
        *(state[f"latest_{name}"].cast(pl.Float64).alias(f"history_previous_{name}") for name in PREVIOUS),
        *(
            pl.when(seen).then(pl.col(name).cast(pl.Float64) - state[f"latest_{name}"]).otherwise(0.0)
            .alias(f"history_change_{name}")
            for name in CHANGED
        ),
    ]


def record_history(state: Mapping[str, int] | None, encounter: Mapping[str, float | str]) -> dict[str, float]:
    """One encounter's `HISTORY_FEATURES` from its patient's `STATE` (None: none known) and its own feature values;
    the returned mapping is read, not changed."""
    if state is None:
        return _FIRST_ENCOUNTER  # the single-encounter path's common case, without building a dictionary
    values = {
        "history_prior_encounters": float(state["encounters"]),
        "history_prior_inpatient_days": float(state["inpatient_days"]),
        "history_prior_readmissions_30d": float(state["readmissions_30d"]),
        "history_previous_readmitted_30d": float(state["latest_readmitted_30d"]),
        **{f"history_previous_{name}": float(state[f"latest_{name}"]) for name in PREVIOUS},
    }
    seen = state["encounters"] > 0
    for name in CHANGED:
        values[f"history_change_{name}"] = float(encounter[name]) - state[f"latest_{name}"] if seen else 0.0
    return values


_FIRST_ENCOUNTER = dict.fromkeys(HISTORY_FEATURES, 0.0)


def encounter_history(raw: pl.DataFrame, features: pl.DataFrame) -> pl.DataFrame:
    """The `HISTORY_FEATURES` of every row of a features table (by `encounter_id`), from the raw encounters."""
    states = states_before(raw)
    joined = features.select(ENCOUNTER, *CHANGED).join(states, on=ENCOUNTER, how="left", maintain_order="left")
    missing = joined["encounters"].null_count()
    if missing:
        raise ValueError(f"{missing} feature rows have no raw encounter of the same encounter_id; history needs every one")
    return joined.select(history_expressions(joined.columns))


def patient_key(identifier: str, key: bytes) -> str:
    """The keyed hash (HMAC-SHA256, hex) that stands for a hospital's patient identifier wherever one is kept."""
    return hmac.new(key, identifier.encode(), hashlib.sha256).hexdigest()


def patient_keys(identifiers: Iterable[Any], key: bytes) -> list[str]:
    """`patient_key` of each identifier, as text."""
    return [patient_key(str(identifier), key) for identifier in identifiers]


def with_history(features: pl.DataFrame, raw: pl.DataFrame) -> pl.DataFrame:
    """A features table with its rows' `HISTORY_FEATURES` appended, from the raw encounters (`encounter_history`)."""
    return pl.concat([features, encounter_history(raw, features)], how="horizontal")
