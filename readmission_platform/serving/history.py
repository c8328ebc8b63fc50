"""A serving worker's copy of every patient's history state, looked up by the keyed hash of the request's identifier.

The states (`lib/history_store`) are read whole into memory and read again when the pipeline writes a new version
(checked every `interval` seconds), so a lookup is a dictionary get for one encounter and one join for a batch, with
no database round trip on the request's path. The hospital's identifier is hashed at once (`history.patient_key`)
and goes no further: not into the log (which keeps the hash), not into the answer, not into this worker's own logs.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping

import polars as pl

from readmission_platform.lib.history import STATE, patient_key
from readmission_platform.lib.history_store import KEY, read_newer
from readmission_platform.lib.reporting import masked

log = logging.getLogger(__name__)


class PatientHistory(threading.Thread):
    """The stored states by patient key, used once a version is read. Without a key nothing is looked up."""

    def __init__(self, url: str | None, key: bytes | None, *, interval: float = 30.0) -> None:
        """`url`: the prediction log's database, where the pipeline stores the states (None: no history)."""
        super().__init__(name="patient-history", daemon=True)
        self.url, self.key, self.interval = url, key, interval
        self.version: int | None = None
        self.frame = pl.DataFrame(schema={KEY: pl.String(), **{name: pl.Int64() for name in STATE}})
        self.by_key: dict[str, dict[str, int]] = {}
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(self.interval):
            self.refresh()

    def refresh(self) -> None:
        """Read the states again if the pipeline wrote a new version; a failure keeps the copy held and is logged."""
        if self.url is None or self.key is None:
            return
        try:
            version, frame = read_newer(self.url, self.version)
        except Exception as error:  # the database is unreachable: keep what is held
            log.warning("cannot read patient history from %s: %s", masked(self.url), error)
            return
        if frame is None:  # the version held, or none stored yet
            return
        self.by_key = {row[KEY]: {name: row[name] for name in STATE} for row in frame.iter_rows(named=True)}
        self.frame, self.version = frame, version
        log.info("patient history version %s: %d patients", version, frame.height)

    def state(self, identifier: str | None) -> Mapping[str, int] | None:
        """The state of the patient a request names; None without an identifier or history. A patient the states do not
        hold has had no encounter yet: a first encounter's state."""
        return self.lookup(identifier)[1]

    def lookup(self, identifier: str | None) -> tuple[str | None, Mapping[str, int] | None]:
        """The keyed hash of the identifier a request gives (None without one or without a key: what the prediction
        log keeps, so the request's outcome can bring the patient's history up to date) and the patient's `state`."""
        if identifier is None or self.key is None:
            return None, None
        key = patient_key(identifier, self.key)
        return key, self.by_key.get(key, dict.fromkeys(STATE, 0)) if self.version is not None else None

    def states(self, identifiers: pl.Series) -> tuple[pl.DataFrame | None, pl.Series, pl.Series | None]:
        """The states (`STATE` columns, null where none is used; None when no row uses one) of a batch's identifiers
        (null: none given), which rows used history, and the identifiers' keyed hashes (None without a key)."""
        given = identifiers.is_not_null()
        if self.key is None or not given.any():
            return None, pl.repeat(False, identifiers.len(), eager=True), None
        keys = pl.Series(KEY, [None if i is None else patient_key(i, self.key) for i in identifiers], pl.String)
        if self.version is None:
            return None, pl.repeat(False, identifiers.len(), eager=True), keys
        joined = keys.to_frame().join(self.frame, on=KEY, how="left", maintain_order="left")
        # Given but not held: a first encounter (zeros), as `state` answers.
        states = joined.select(pl.when(given).then(pl.col(n).fill_null(0)).alias(n) for n in STATE)
        return states, given, keys

