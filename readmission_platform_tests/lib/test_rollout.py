"""The rollout's signals and judgement on planted prediction-log rows."""

from datetime import UTC, datetime, timedelta

import numpy as np
import polars as pl
import pytest

from readmission_platform.lib.predictions import TYPES
from readmission_platform.lib.rollout import (
    ADVANCE,
    CANARY,
    PRODUCTION,
    ROLLBACK,
    ROLLOUT_COLUMNS,
    SHADOW,
    WAIT,
    Foreseen,
    RolloutPolicy,
    foresee,
    judge,
    measure,
    next_stage,
)

START = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
POLICY = RolloutPolicy(stage_seconds=60, min_requests=100)
THRESHOLD = 0.15


def shadowed(rows=400, shift=0.0, failing=0, ms=12.0, seed=0) -> pl.DataFrame:
    """Production v1 answers; candidate v2 scores the same encounters in shadow, `shift` higher, failing `failing`."""
    rng = np.random.default_rng(seed)
    production = rng.beta(1.2, 9, rows)
    candidate = np.clip(production + rng.normal(0, 0.01, rows) + shift, 0, 1)
    error = [f"raised ValueError: bad {i}" if i < failing else None for i in range(rows)]
    return pl.DataFrame(
        {
            "request_id": [f"r{i}" for i in range(rows)],
            "predicted_at": [START + timedelta(seconds=i / 10) for i in range(rows)],
            "model_version": "1", "probability": production, "decision": production >= THRESHOLD, "stage": PRODUCTION,
            "shadow_version": "2", "shadow_probability": [None if e else p for e, p in zip(error, candidate)],
            "candidate_error": error, "candidate_ms": ms,
        }  # fmt: skip
    ).cast({name: TYPES[name] for name in ROLLOUT_COLUMNS})


def canaried(rows=1_000, share=0.25, shift=0.0, seed=0) -> pl.DataFrame:
    """`share` of requests answered by canary v2 (its scores `shift` higher), the rest by production v1."""
    rng = np.random.default_rng(seed)
    probability = rng.beta(1.2, 9, rows)
    canary = rng.random(rows) < share
    probability = np.where(canary, np.clip(probability + shift, 0, 1), probability)
    return pl.DataFrame(
        {
            "request_id": [f"r{i}" for i in range(rows)],
            "predicted_at": [START + timedelta(seconds=i / 10) for i in range(rows)],
            "model_version": np.where(canary, "2", "1"), "probability": probability, "decision": probability >= THRESHOLD,
            "stage": np.where(canary, CANARY, PRODUCTION), "shadow_version": None, "shadow_probability": None,
            "candidate_error": None, "candidate_ms": [15.0 if c else None for c in canary],
        }  # fmt: skip
    ).cast({name: TYPES[name] for name in ROLLOUT_COLUMNS})


def test_a_healthy_shadow_advances_to_the_first_canary_step_after_its_time_and_requests():
    signals = measure(shadowed(), SHADOW, "2", THRESHOLD)
    assert signals.requests == 400 and signals.errors == 0 and signals.compared == 400
    assert signals.agreement > 0.9 and signals.psi < 0.05 and signals.latency_p95_ms == 12.0

    early = judge("2", SHADOW, 0.0, START, START + timedelta(seconds=30), signals, POLICY)
    assert early.action == WAIT and early.stage == SHADOW and "30 of 60 s" in early.reason
    step = judge("2", SHADOW, 0.0, START, START + timedelta(seconds=61), signals, POLICY)
    assert (step.action, step.stage, step.share) == (ADVANCE, CANARY, 0.10)
    assert "advances from shadow to canary at 10%" in step.reason


def test_too_few_requests_wait_however_long_the_stage_lasted():
    signals = measure(shadowed(rows=40), SHADOW, "2", THRESHOLD)
    step = judge("2", SHADOW, 0.0, START, START + timedelta(hours=5), signals, POLICY)
    assert step.action == WAIT and "40 of 100 requests" in step.reason


def test_a_candidate_that_raises_is_rolled_back_from_its_first_requests():
    signals = measure(shadowed(rows=10, failing=3), SHADOW, "2", THRESHOLD)
    assert signals.errors == 3 and signals.requests == 10
    step = judge("2", SHADOW, 0.0, START, START + timedelta(seconds=1), signals, POLICY)
    assert step.action == ROLLBACK and step.stage is None
    assert "failed 3 of 10 requests (30.0%)" in step.reason


def test_one_failure_in_a_large_healthy_stage_is_tolerated():
    signals = measure(shadowed(rows=400, failing=1), SHADOW, "2", THRESHOLD)
    assert judge("2", SHADOW, 0.0, START, START + timedelta(seconds=61), signals, POLICY).action == ADVANCE


def test_shifted_shadow_scores_are_rolled_back_for_disagreement_and_psi():
    signals = measure(shadowed(shift=0.2), SHADOW, "2", THRESHOLD)
    assert signals.agreement < 0.8 and signals.psi > 0.25
    step = judge("2", SHADOW, 0.0, START, START + timedelta(seconds=5), signals, POLICY)
    assert step.action == ROLLBACK and "agrees with production on" in step.reason and "PSI" in step.reason


def test_a_shadow_that_differs_as_its_test_comparison_foresaw_advances_and_one_that_differs_more_is_rolled_back():
    rows = shadowed(shift=0.2)
    signals = measure(rows, SHADOW, "2", THRESHOLD)
    later = START + timedelta(seconds=61)
    # The same disagreement, foreseen by the promotion's comparison on test patients: no evidence against it.
    foreseen = foresee(rows["shadow_probability"], THRESHOLD, rows["probability"], THRESHOLD)
    assert foreseen == Foreseen(agreement=signals.agreement, psi=signals.psi)
    assert judge("2", SHADOW, 0.0, START, later, signals, POLICY, foreseen).action == ADVANCE
    # Foreseen as a close copy of production, it is judged as one; the reason says what was foreseen and allowed.
    close = Foreseen(agreement=0.95, psi=0.05)
    step = judge("2", SHADOW, 0.0, START, later, signals, POLICY, close)
    assert step.action == ROLLBACK and "below 80%" in step.reason and "PSI" in step.reason
    foreseen_less = Foreseen(agreement=signals.agreement + 0.2, psi=signals.psi / 4)
    step = judge("2", SHADOW, 0.0, START, later, signals, POLICY, foreseen_less)
    assert step.action == ROLLBACK
    assert f"its test comparison foresaw {foreseen_less.agreement:.1%}, less 10%" in step.reason
    assert f"its test comparison foresaw {foreseen_less.psi:.3f}, plus 0.25" in step.reason
    # A version promoted before the figures were kept has none: the policy's own limits.
    assert Foreseen.from_tags({}) is None and Foreseen.from_tags(foreseen.as_tags()) == Foreseen(round(foreseen.agreement, 4), round(foreseen.psi, 4))
    with pytest.raises(ValueError, match="expected as many of the same encounters"):
        foresee([0.1, 0.2], THRESHOLD, [0.1], THRESHOLD)


def test_a_slow_candidate_is_rolled_back():
    signals = measure(shadowed(ms=450.0), SHADOW, "2", THRESHOLD)
    step = judge("2", SHADOW, 0.0, START, START + timedelta(seconds=61), signals, POLICY)
    assert step.action == ROLLBACK and "p95 latency 450.0 ms is above 200 ms" in step.reason


def test_a_healthy_canary_steps_up_and_the_last_step_reaches_production():
    signals = measure(canaried(share=0.25), CANARY, "2", THRESHOLD)
    assert 200 < signals.requests < 300 and signals.agreement is None and signals.psi < 0.1
    later = START + timedelta(seconds=61)
    step = judge("2", CANARY, 0.25, START, later, signals, POLICY)
    assert (step.action, step.stage, step.share) == (ADVANCE, CANARY, 0.50)
    last = judge("2", CANARY, 1.0, START, later, signals, POLICY)
    assert (last.action, last.stage) == (ADVANCE, PRODUCTION) and "to production" in last.reason


def test_a_canary_whose_scores_shifted_is_rolled_back():
    signals = measure(canaried(share=0.5, shift=0.25), CANARY, "2", THRESHOLD)
    step = judge("2", CANARY, 0.5, START, START + timedelta(seconds=2), signals, POLICY)
    assert step.action == ROLLBACK and "canary at 50%" in step.reason and "PSI" in step.reason


def test_a_psi_against_a_handful_of_production_s_answers_is_not_judged():
    # At 100 % production answers only the requests routed before the workers followed the new share.
    rows = canaried(share=1.0, seed=1).vstack(canaried(rows=20, share=0.0, seed=2).with_columns(probability=np.linspace(0.3, 0.9, 20)))
    signals = measure(rows, CANARY, "2", THRESHOLD)
    assert signals.reference == 20 and signals.psi > 0.25
    step = judge("2", CANARY, 1.0, START, START + timedelta(seconds=61), signals, POLICY)
    assert (step.action, step.stage) == (ADVANCE, PRODUCTION)
    assert "(20 of production's)" in step.reason


def test_a_whole_canary_is_compared_with_production_s_answers_from_before_it():
    before = canaried(share=0.0, seed=3)
    steady = measure(canaried(share=1.0, seed=1), CANARY, "2", THRESHOLD, before)
    assert steady.reference == 1_000 and steady.psi < 0.1 and steady.requests == 1_000
    shifted = measure(canaried(share=1.0, shift=0.25, seed=1), CANARY, "2", THRESHOLD, before)
    step = judge("2", CANARY, 1.0, START, START + timedelta(seconds=61), shifted, POLICY)
    assert step.action == ROLLBACK and "canary at 100%" in step.reason and "PSI" in step.reason


def test_live_performance_falling_short_rolls_back_at_any_time():
    signals = measure(canaried(rows=50), CANARY, "2", THRESHOLD)
    signals = type(signals)(**{**signals.__dict__, "live": "live ROC-AUC 0.55 of v2 is clearly below 0.66 of v1"})
    step = judge("2", CANARY, 0.1, START, START + timedelta(seconds=1), signals, POLICY)
    assert step.action == ROLLBACK and "clearly below" in step.reason


def test_stages_follow_the_configured_steps():
    steps = (0.1, 0.5)
    assert next_stage(SHADOW, 0.0, steps) == (CANARY, 0.1)
    assert next_stage(CANARY, 0.1, steps) == (CANARY, 0.5)
    assert next_stage(CANARY, 0.5, steps) == (PRODUCTION, 0.0)
    assert next_stage(SHADOW, 0.0, ()) == (PRODUCTION, 0.0)


@pytest.mark.parametrize(
    ("policy", "message"),
    [
        ({"steps": (0.5, 0.25)}, "rising shares"),
        ({"steps": (0.0, 1.0)}, "rising shares"),
        ({"min_requests": 0}, "min_requests"),
        ({"min_agreement": 1.5}, "min_agreement"),
        ({"max_psi": -1.0}, "max_psi"),
    ],
)
def test_a_bad_policy_is_named(policy, message):
    with pytest.raises(ValueError, match=message):
        RolloutPolicy(**policy)


def test_rows_without_the_rollout_columns_are_named():
    with pytest.raises(ValueError, match="lack"):
        measure(pl.DataFrame({"request_id": ["a"]}), SHADOW, "2", THRESHOLD)
    with pytest.raises(ValueError, match="not a rollout stage"):
        measure(shadowed(), PRODUCTION, "2", THRESHOLD)
