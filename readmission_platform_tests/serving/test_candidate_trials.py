"""`serving.rollout.Trials` in process, on real models: a candidate's answer, or why production answers instead."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

from readmission_platform.lib.encounter import features_frame
from readmission_platform.lib.features import record_features
from readmission_platform.lib.cleaning import clean_record
from readmission_platform.serving.model import SMOKE_ENCOUNTERS, serve
from readmission_platform.serving.rollout import SHADOW, Candidate, Trials, candidate_columns
from readmission_platform_tests.serving.planted import MARKER, MARKER_COLUMN, Planted


def candidate_of(model, threshold: float, action: str | None = None) -> Candidate:
    pipeline = model if action is None else Planted(model, action=action, seconds=0.5)
    served = serve(pipeline, {"name": "m", "version": "7", "threshold": threshold, "base_rate": 0.1})
    return Candidate("7", SHADOW, 0.0, served)


@pytest.fixture(scope="module")
def linear(sample_candidates):
    return sample_candidates["logistic_regression"]


def features(**changed):
    return record_features(clean_record(dict(SMOKE_ENCOUNTERS[0]) | changed))


def test_a_working_candidate_gives_its_own_probabilities_and_its_time(linear):
    candidate = candidate_of(linear.model, linear.threshold)
    trial = asyncio.run(Trials(200).one(candidate, features()))
    assert trial.ok and trial.answer == pytest.approx(candidate.model.probability(features()), abs=1e-12) and trial.ms > 0
    frame = features_frame(list(SMOKE_ENCOUNTERS))
    many = Trials(200).many(candidate, frame)
    np.testing.assert_allclose(many.answer, candidate.model.probabilities(frame), atol=1e-12)
    assert candidate_columns(candidate, trial) == {"shadow_version": "7", "shadow_probability": trial.answer,
                                                   "candidate_error": None, "candidate_ms": trial.ms}  # fmt: skip


def test_a_candidate_that_raises_or_does_not_load_gives_the_reason(linear):
    raising = candidate_of(linear.model, linear.threshold, "raise")
    trial = asyncio.run(Trials(200).one(raising, features(**{MARKER_COLUMN: MARKER})))
    assert trial.error == "raised ValueError: planted failure on the marker encounter" and trial.answer is None
    unloaded = Candidate("8", SHADOW, 0.0, None, "version 8 cannot be loaded: corrupt")
    assert Trials(200).many(unloaded, features_frame(list(SMOKE_ENCOUNTERS))).error == (
        "did not load: version 8 cannot be loaded: corrupt"
    )


def test_a_slow_candidate_is_given_up_at_its_budget_and_skipped_while_still_running(linear):
    slow = candidate_of(linear.model, linear.threshold, "sleep")
    trials = Trials(100)
    marked = features(**{MARKER_COLUMN: MARKER})

    async def twice():
        started = time.perf_counter()
        first = await trials.one(slow, marked)
        waited = time.perf_counter() - started
        second = await trials.one(slow, features())  # no marker, but the first call still runs
        return first, waited, second

    first, waited, second = asyncio.run(twice())
    # Given up at the budget, not before it; that it did not wait for the slow call is what the second call shows,
    # with no clock: the first call is still running when it comes. (A bound on the wait from above would only
    # measure the machine's load.)
    assert first.error == "slower than 100 ms" and waited >= 0.09
    assert second.error.startswith("slower than 100 ms: an earlier call is still running")
    deadline = time.monotonic() + 30  # once the stalled call has finished, the candidate is tried again
    while not (after := asyncio.run(trials.one(slow, features()))).ok:
        assert after.error.endswith("still running") and time.monotonic() < deadline, after
        time.sleep(0.2)
    # A batch's budget grows with its rows: 100 ms per 1,000, at least once.
    assert trials.budget_ms(1) == 100 and trials.budget_ms(10_000) == 1_000
