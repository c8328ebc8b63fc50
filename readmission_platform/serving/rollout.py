"""A worker's candidate: the version behind `shadow` or `canary`, tried beside production without ever failing a request.

The registry holds the rollout (lib/registry.py: the aliases and the tag `rollout.share`); the model watcher reads it
with production's alias and keeps a `Candidate` here. Each call to a candidate goes through `Trials`: on a small
thread pool of its own, within a time budget; one that did not load, raised or ran over the budget gives a
`Trial` with the reason, counted by cause, warned about once per version and cause, and production answers.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import polars as pl

from readmission_platform.lib.predictions import RESULT_TYPES
from readmission_platform.lib.registry import CANARY, PRODUCTION, ROLLOUT_SHARE, SHADOW, ModelRegistry
from readmission_platform.lib.routing import parse_share
from readmission_platform.serving.metrics import CANDIDATE_FAILURES
from readmission_platform.serving.model import ServedModel

log = logging.getLogger(__name__)

LOAD, RAISED, SLOW = "load", "raised", "slow"  # the causes of a candidate's failure, the metric's label values
ROWS_PER_BUDGET = 1_000  # a batch's budget is the single encounter's budget per this many rows (at least once)


@dataclass(frozen=True)
class RolloutState:
    """What the registry says: production's version, the candidate's version and stage, the canary's share."""

    production: str | None
    candidate: str | None = None
    stage: str | None = None  # SHADOW or CANARY with a candidate
    share: float = 0.0
    problem: str | None = None  # why the state was read with share 0 (a share tag that is no share)


def rollout_state(registry: ModelRegistry) -> RolloutState:
    """The rollout in the registry, in one read. A candidate that is production's version is no candidate; with both
    candidate aliases set (never written so), `canary` wins: it is the later stage."""
    from mlflow.exceptions import MlflowException

    try:
        found = registry.client.get_registered_model(registry.model_name)
    except MlflowException as error:
        if error.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        return RolloutState(production=None)
    aliases = {alias: str(version) for alias, version in found.aliases.items()}  # MLflow gives the numbers as ints
    tags = found.tags
    production = aliases.get(PRODUCTION)
    stage = CANARY if CANARY in aliases else SHADOW if SHADOW in aliases else None
    candidate = aliases.get(stage) if stage else None
    if candidate is None or candidate == production:
        return RolloutState(production=production)
    if stage == SHADOW:
        return RolloutState(production, candidate, SHADOW)
    try:
        share = parse_share(tags.get(ROLLOUT_SHARE))
    except ValueError as error:
        return RolloutState(production, candidate, CANARY, 0.0, f"tag {ROLLOUT_SHARE}: {error}; the canary answers nothing")
    return RolloutState(production, candidate, CANARY, share)


@dataclass(frozen=True)
class Candidate:
    """A worker's candidate: its version, stage and share, and the model (None: it did not load, `error` says why)."""

    version: str
    stage: str
    share: float
    model: ServedModel | None
    error: str | None = None

    def describe(self) -> dict[str, Any]:
        """What /model says of it."""
        described: dict[str, Any] = {"version": self.version, "stage": self.stage, "loaded": self.model is not None}
        if self.stage == CANARY:
            described["share"] = self.share
        if self.model is not None:
            described |= {"family": self.model.info.get("family"), "threshold": self.model.threshold,
                          "loaded_at": self.model.loaded_at}  # fmt: skip
        else:
            described["error"] = self.error
        return described


def count_failures_of(candidate: Candidate) -> None:
    """Make the candidate's failure counters exist at zero, one per cause, as soon as it is in place: a rate over a
    counter Prometheus has never seen misses its first failures, and a rollout dashboard shows 0, not "no data"."""
    for cause in (LOAD, RAISED, SLOW):
        CANDIDATE_FAILURES.labels(model_version=candidate.version, stage=candidate.stage, cause=cause)


@dataclass(frozen=True)
class Trial:
    """What one call to a candidate gave: its answer, or the reason it has none; and the time it took (None: not run)."""

    answer: Any = None
    error: str | None = None
    ms: float | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


def _timed(score: Callable[[Any], Any], given: Any) -> tuple[Any, float]:
    started = time.perf_counter()
    answer = score(given)
    return answer, (time.perf_counter() - started) * 1000.0


class Trials:
    """Runs a candidate's scoring off the caller's thread, within a budget of `timeout_ms` per encounter (per
    `ROWS_PER_BUDGET` rows of a batch). While a call that ran over its budget is still running, later calls fail at
    once as slow instead of queueing behind it."""

    def __init__(self, timeout_ms: float, threads: int = 2) -> None:
        self.timeout_ms = timeout_ms
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="candidate")
        self._overdue = 0
        self._lock = threading.Lock()
        self._warned: set[tuple[str, str]] = set()

    def budget_ms(self, rows: int = 1) -> float:
        return self.timeout_ms * max(1.0, rows / ROWS_PER_BUDGET)

    def fail(self, candidate: Candidate, cause: str, error: str, ms: float | None = None, *, count: int = 1) -> Trial:
        """Count a failure of the candidate, warn once per version and cause, and give the `Trial` that says why."""
        CANDIDATE_FAILURES.labels(model_version=candidate.version, stage=candidate.stage, cause=cause).inc(count)
        if (candidate.version, cause) not in self._warned:
            self._warned.add((candidate.version, cause))
            log.warning("%s version %s failed (%s), production answers in its place; further failures of this cause "
                        "are counted, not logged: %s", candidate.stage, candidate.version, cause, error)  # fmt: skip
        return Trial(error=error, ms=ms)

    def _start(self, candidate: Candidate, score: Callable[[Any], Any], given: Any) -> Future | Trial:
        if candidate.model is None:
            return self.fail(candidate, LOAD, f"did not load: {candidate.error}")
        with self._lock:
            overdue = self._overdue
        if overdue:
            return self.fail(candidate, SLOW, f"slower than {self.timeout_ms:g} ms: an earlier call is still running")
        return self._pool.submit(_timed, score, given)

    def _overran(self, candidate: Candidate, future: Future, budget: float) -> Trial:
        with self._lock:
            self._overdue += 1

        def finished(_: Future) -> None:
            with self._lock:
                self._overdue -= 1

        future.add_done_callback(finished)
        return self.fail(candidate, SLOW, f"slower than {budget:g} ms", budget)

    def _finish(self, candidate: Candidate, future: Future, rows: int | None) -> Trial:
        """The trial of a finished call: its answer, checked to be probabilities (`rows` of them, or one number)."""
        try:
            answer, ms = future.result(0)
        except Exception as error:
            return self.fail(candidate, RAISED, f"raised {type(error).__name__}: {error}"[:500])
        if not _probabilities(answer, rows):
            shown = f"{np.shape(answer)}-shaped values" if rows is not None else repr(answer)
            wanted = f"{rows} probabilities" if rows is not None else "a probability"
            return self.fail(candidate, RAISED, f"gave {shown}, not {wanted} in [0, 1]"[:500], ms)
        return Trial(answer=answer, ms=ms)

    async def one(self, candidate: Candidate, features: Mapping[str, float | str]) -> Trial:
        """The candidate's probability of one encounter's features, awaited within the budget."""
        started = self._start(candidate, candidate.model.probability if candidate.model else None, features)
        if isinstance(started, Trial):
            return started
        budget = self.budget_ms()
        waited = asyncio.wrap_future(started)
        waited.add_done_callback(_seen)  # its outcome is read from `started`; asyncio would warn of an unread error
        done, _ = await asyncio.wait({waited}, timeout=budget / 1000.0)
        if not done:
            return self._overran(candidate, started, budget)
        return self._finish(candidate, started, None)

    def many(self, candidate: Candidate, frame: pl.DataFrame) -> Trial:
        """The candidate's probabilities of a features frame's rows (an array), waited for within the budget."""
        if frame.is_empty():
            return Trial(answer=np.empty(0), ms=0.0)
        started = self._start(candidate, candidate.model.probabilities if candidate.model else None, frame)
        if isinstance(started, Trial):
            return started
        budget = self.budget_ms(frame.height)
        concurrent.futures.wait([started], timeout=budget / 1000.0)
        if not started.done():
            return self._overran(candidate, started, budget)
        return self._finish(candidate, started, frame.height)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def _seen(future: asyncio.Future) -> None:
    if not future.cancelled():
        future.exception()


def _probabilities(values: Any, rows: int | None) -> bool:
    """`rows` probabilities in an array, or (`rows` None) one probability as a number."""
    try:
        array = np.asarray(values, dtype=float)
    except (TypeError, ValueError):
        return False
    return array.shape == ((rows,) if rows is not None else ()) and bool(np.all((array >= 0.0) & (array <= 1.0)))


# The prediction log's candidate columns (lib/predictions.py) of a row no candidate was tried for.
NO_CANDIDATE: dict[str, Any] = {"shadow_version": None, "shadow_probability": None, "candidate_error": None, "candidate_ms": None}


def candidate_columns(candidate: Candidate | None, trial: Trial | None) -> dict[str, Any]:
    """The log's candidate columns of one answer: the shadow's version (whenever it was tried) and probability, or
    why the candidate failed and production answered, and the candidate's time."""
    if candidate is None or trial is None:
        return NO_CANDIDATE
    shadow = candidate.stage == SHADOW
    return {
        "shadow_version": candidate.version if shadow else None,
        "shadow_probability": float(trial.answer) if shadow and trial.ok else None,
        "candidate_error": trial.error,
        "candidate_ms": trial.ms,
    }


def candidate_frame_columns(
    candidate: Candidate | None, trial: Trial | None, routed: np.ndarray | None, rows: int
) -> dict[str, pl.Expr | pl.Series]:
    """`candidate_columns` of a batch's scored rows: a shadow's on every row; a canary's on the rows routed to it."""
    if candidate is None or trial is None:
        return {name: pl.lit(None, dtype=RESULT_TYPES[name]) for name in NO_CANDIDATE}
    if candidate.stage == SHADOW:
        return {
            "shadow_version": pl.lit(candidate.version, dtype=pl.String),
            "shadow_probability": pl.Series(trial.answer, dtype=pl.Float64) if trial.ok else pl.lit(None, dtype=pl.Float64),
            "candidate_error": pl.lit(trial.error, dtype=pl.String),
            "candidate_ms": pl.lit(trial.ms, dtype=pl.Float64),
        }
    tried = pl.Series(routed if routed is not None else np.ones(rows, dtype=bool))
    return {
        "shadow_version": pl.lit(None, dtype=pl.String),
        "shadow_probability": pl.lit(None, dtype=pl.Float64),
        "candidate_error": pl.when(tried).then(pl.lit(trial.error, dtype=pl.String)),
        "candidate_ms": pl.when(tried).then(pl.lit(trial.ms, dtype=pl.Float64)),
    }
