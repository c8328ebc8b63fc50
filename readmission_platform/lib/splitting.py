"""Patient-grouped train / validation / test split that depends on nothing but the patient id."""

from __future__ import annotations

import hashlib
from itertools import accumulate

import numpy as np
import polars as pl

SPLIT = "split"
PATIENT = "patient_nbr"
SPLIT_FRACTIONS = {"train": 0.70, "validation": 0.15, "test": 0.15}
SPLITS = tuple(SPLIT_FRACTIONS)

# Changing the key moves patients between sides and leaks past test patients into training:
# treat it as part of the data contract, like the column names.
_HASH_KEY = b"readmission-platform/split/v1"
_UPPER_BOUNDS = np.array(list(accumulate(SPLIT_FRACTIONS.values()))[:-1])


def _positions(patients: list[int]) -> np.ndarray:
    """Each patient id → a fixed number in [0, 1), uniform over ids."""
    digests = (
        hashlib.blake2b(str(patient).encode(), digest_size=8, key=_HASH_KEY).digest() for patient in patients
    )
    return np.fromiter((int.from_bytes(d, "big") for d in digests), dtype=np.uint64, count=len(patients)) / 2.0**64


def assign_split(frame: pl.DataFrame) -> pl.DataFrame:
    """Add a `split` column ('train', 'validation' or 'test') chosen by a keyed hash of `patient_nbr`.

    Polars' own `hash` may change between versions and processes, so the hash is blake2b over the id's text.
    """
    if PATIENT not in frame.columns:
        raise ValueError(f"cannot split: the frame has no '{PATIENT}' column; its columns are {frame.columns}")
    nulls = frame.get_column(PATIENT).null_count()
    if nulls:
        raise ValueError(f"cannot split: '{PATIENT}' is null in {nulls} rows; every row needs a patient id")
    patients = frame.get_column(PATIENT).unique()
    sides = np.array(SPLITS)[np.searchsorted(_UPPER_BOUNDS, _positions(patients.to_list()), side="right")]
    return frame.with_columns(
        pl.col(PATIENT).replace_strict(patients, pl.Series(sides), return_dtype=pl.String).alias(SPLIT)
    )


def split_overlap(frame: pl.DataFrame) -> dict[str, int]:
    """How many patients the frame holds and how many of them sit in more than one split."""
    sides_per_patient = frame.group_by(PATIENT).agg(pl.col(SPLIT).n_unique().alias("sides"))
    return {
        "patients": sides_per_patient.height,
        "patients_in_several_splits": sides_per_patient.filter(pl.col("sides") > 1).height,
    }
