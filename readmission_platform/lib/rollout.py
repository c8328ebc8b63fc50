"""When a candidate in rollout moves on: its live signals from the prediction log since its stage began, judged
against a policy. A healthy candidate advances (shadow → canary at each configured share → production) once its stage
has lasted long enough and seen enough requests; an unhealthy one is rolled back at once.

Pure functions over a frame of the prediction log (`lib/predictions.read_predictions` with ROLLOUT_COLUMNS); the
sensor (`defs/promotion/sensors.py`) and `readmission rollout` call them and act on the registry.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

import polars as pl

from readmission_platform.lib.drift import PSI_SIGNIFICANT, psi_report
from readmission_platform.lib.live import Limits, clearly_worse, judge_discrimination
from readmission_platform.lib.promotion import ROLLOUT_ADVANCED, ROLLOUT_ROLLED_BACK, rollout_row

if TYPE_CHECKING:
    from readmission_platform.lib.registry import ModelRegistry, Rollout

SHADOW, CANARY, PRODUCTION = "shadow", "canary", "production"
ADVANCE, ROLLBACK, WAIT = "advance", "rollback", "wait"
# What the sensor reads of the prediction log (interfaces: stage, shadow_version, shadow_probability,
# candidate_error and candidate_ms are written by the serving half of the rollout).
ROLLOUT_COLUMNS = (
    "request_id", "predicted_at", "model_version", "probability", "decision",
    "stage", "shadow_version", "shadow_probability", "candidate_error", "candidate_ms",
)  # fmt: skip


@dataclass(frozen=True)
class RolloutPolicy:
    """The stages' shares and minimums, and the limits a candidate's live signals must keep."""

    steps: tuple[float, ...] = (0.10, 0.25, 0.50, 0.75, 1.00)
    """The canary's shares of requests, one step after another, after shadow and before production."""
    stage_seconds: float = 3600.0
    """The least time in shadow and at each canary step before it may advance."""
    min_requests: int = 200
    """The least requests the candidate takes part in at a stage before it may advance, and before its latency,
    agreement and score distribution are judged."""
    max_error_share: float = 0.01
    """Requests the candidate failed (raised, did not load, answered too slowly) over those it took part in."""
    max_candidate_ms: float = 200.0
    """The 95th percentile of the candidate's milliseconds per request."""
    min_agreement: float = 0.8
    """In shadow: the share of encounters on which the candidate's decision is production's. Lowered for a candidate
    the promotion's test comparison foresaw disagreeing more (`Foreseen`): to that share less `agreement_margin`."""
    max_psi: float = PSI_SIGNIFICANT
    """The population stability index of the candidate's probabilities against production's (0.25: significant).
    For a candidate whose test comparison foresaw a shift, that shift plus this."""
    agreement_margin: float = 0.1
    """How far below the agreement its test comparison foresaw a candidate's may fall (sampling and the live
    population's difference from the test patients')."""

    def __post_init__(self) -> None:
        steps = tuple(self.steps)
        if any(not (0 < s <= 1) for s in steps) or list(steps) != sorted(set(steps)):
            raise ValueError(f"rollout steps {list(steps)} must be rising shares of requests in (0, 1], like 0.1, 0.25, 1")
        for name in ("stage_seconds", "max_error_share", "max_candidate_ms", "max_psi"):
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) >= 0):
                raise ValueError(f"rollout {name} is {getattr(self, name)}; expected a number of at least 0")
        if self.min_requests < 1:
            raise ValueError(f"rollout min_requests is {self.min_requests}; expected at least 1")
        for name in ("min_agreement", "agreement_margin"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"rollout {name} is {getattr(self, name)}; expected a share in [0, 1]")


@dataclass(frozen=True)
class Foreseen:
    """How the candidate and production differ on the promotion's test patients, which the decision to promote has
    already weighed: the share of encounters on which their decisions agree and the PSI of the candidate's
    probabilities against production's. A better model disagrees with the one it replaces, and may by far (a linear
    first version and a LightGBM successor: benchmarks/README.md, Training); in shadow and canary what is judged is
    whether it differs more than that, which no evidence backs."""

    agreement: float
    psi: float

    TAGS = ("promotion.agreement", "promotion.psi")  # where a version keeps them

    def as_tags(self) -> dict[str, str]:
        return {self.TAGS[0]: f"{self.agreement:.4f}", self.TAGS[1]: f"{self.psi:.4f}"}

    @classmethod
    def from_tags(cls, tags: Mapping[str, str]) -> Foreseen | None:
        """The figures a version was tagged with; None for a version promoted before they were kept, or without them."""
        try:
            agreement, psi = (float(tags[name]) for name in cls.TAGS)
        except (KeyError, ValueError):
            return None
        return cls(agreement, psi) if math.isfinite(agreement) and math.isfinite(psi) else None


def foresee(candidate, candidate_threshold: float, production, production_threshold: float) -> Foreseen:
    """`Foreseen` from both models' probabilities of the same encounters and their thresholds, as `measure` reads them
    from shadowed requests."""
    candidate, production = pl.Series(candidate, dtype=pl.Float64), pl.Series(production, dtype=pl.Float64)
    if candidate.len() != production.len() or candidate.is_empty():
        raise ValueError(f"{candidate.len()} and {production.len()} probabilities; expected as many of the same encounters, at least one")
    agreement = float(((candidate >= candidate_threshold) == (production >= production_threshold)).mean())
    return Foreseen(agreement=agreement, psi=_psi(production, candidate) or 0.0)


@dataclass(frozen=True)
class Signals:
    """What the prediction log says of the candidate since its stage began."""

    requests: int
    """Requests it took part in: scored in shadow, answered as canary, or failed and answered by production."""
    errors: int
    latency_p95_ms: float | None
    compared: int
    """Encounters with both its probability and production's: shadowed ones, or in canary its own answers."""
    agreement: float | None
    """Shadow only: the share of shadowed encounters on which its decision equals production's."""
    psi: float | None
    reference: int = 0
    """Production's probabilities the PSI compares the candidate's with: the shadowed encounters', or in canary
    production's answers over the stage (or just before it, when the stage left production too few)."""
    live: str | None = None
    """Why its matured live performance falls short, when it does (`lib/live`)."""

    @property
    def error_share(self) -> float:
        return self.errors / self.requests if self.requests else 0.0

    def as_json(self) -> str:
        return json.dumps(asdict(self) | {"error_share": self.error_share}, sort_keys=True)

    def describe(self) -> str:
        parts = [f"{self.requests:,} requests", f"{self.errors:,} failed ({self.error_share:.1%})"]
        if self.latency_p95_ms is not None:
            parts.append(f"p95 {self.latency_p95_ms:.1f} ms")
        if self.agreement is not None:
            parts.append(f"agrees with production on {self.agreement:.1%} of {self.compared:,} shadowed encounters")
        if self.psi is not None:
            parts.append(f"PSI of its probabilities against production's {self.psi:.3f} ({self.reference:,} of production's)")
        if self.live:
            parts.append(self.live)
        return ", ".join(parts)


@dataclass(frozen=True)
class Step:
    """What to do with the candidate: ADVANCE, ROLLBACK or WAIT; `stage` and `share` after the step (None: out)."""

    action: str
    stage: str | None
    share: float
    reason: str


def _psi(reference: pl.Series, current: pl.Series) -> float | None:
    reference, current = reference.drop_nulls(), current.drop_nulls()
    if reference.is_empty() or current.is_empty():
        return None
    report = psi_report(
        pl.DataFrame({"probability": reference}), pl.DataFrame({"probability": current}), numeric=("probability",), categorical=()
    )
    return float(report["psi"][0])


def measure(rows: pl.DataFrame, stage: str, version: str, threshold: float, before: pl.DataFrame | None = None) -> Signals:
    """The candidate `version`'s signals in `stage` from the prediction log's ROLLOUT_COLUMNS since the stage began;
    `threshold` is its decision threshold (for agreement with production's decisions). In canary, `before` (rows
    from just before the stage) adds production's answers to compare the candidate's probabilities with."""
    if stage not in (SHADOW, CANARY):
        raise ValueError(f"stage {stage!r} is not a rollout stage; expected {SHADOW!r} or {CANARY!r}")
    for frame in (rows,) if before is None else (rows, before):
        if missing := [c for c in ROLLOUT_COLUMNS if c not in frame.columns]:
            raise ValueError(f"the prediction rows lack {missing}; read them with ROLLOUT_COLUMNS")
    failed = pl.col("candidate_error").is_not_null()
    if stage == SHADOW:
        took_part = (pl.col("shadow_version") == version) | failed
        scored = rows.filter((pl.col("shadow_version") == version) & pl.col("shadow_probability").is_not_null() & ~failed)
        candidate, reference = scored["shadow_probability"], scored["probability"]
        agreement = float(((candidate >= threshold) == scored["decision"]).mean()) if scored.height else None
    else:
        canary = (pl.col("stage") == CANARY) & (pl.col("model_version") == version)
        took_part = canary | failed
        scored = rows.filter(canary & ~failed)
        # Requests are split by a hash of their id, so production's answers over the same time are the comparison.
        compared_with = rows if before is None else pl.concat([before.select(ROLLOUT_COLUMNS), rows.select(ROLLOUT_COLUMNS)])
        production = compared_with.filter(
            (pl.col("stage").fill_null(PRODUCTION) == PRODUCTION) & (pl.col("model_version") != version) & ~failed
        )
        candidate, reference, agreement = scored["probability"], production["probability"], None
    involved = rows.filter(took_part.fill_null(False))
    per_request = involved.group_by("request_id").agg(failed.any().alias("failed"), pl.col("candidate_ms").max())
    timed = per_request["candidate_ms"].drop_nulls()
    return Signals(
        requests=per_request.height,
        errors=int(per_request["failed"].sum()),
        latency_p95_ms=float(timed.quantile(0.95, "linear")) if timed.len() else None,
        compared=scored.height,
        agreement=agreement,
        psi=_psi(reference, candidate),
        reference=reference.drop_nulls().len(),
    )


def next_stage(stage: str, share: float, steps: tuple[float, ...]) -> tuple[str, float]:
    """The stage and share after `stage` at `share`: shadow → the first step → … → the last step → production."""
    if stage == SHADOW:
        return (CANARY, steps[0]) if steps else (PRODUCTION, 0.0)
    later = [s for s in steps if s > share + 1e-9]
    return (CANARY, later[0]) if later else (PRODUCTION, 0.0)


def _where(stage: str, share: float) -> str:
    return f"canary at {share:.0%}" if stage == CANARY else stage


def limits(policy: RolloutPolicy, foreseen: Foreseen | None) -> tuple[float, float, str, str]:
    """The least agreement and the largest PSI a candidate may show, and what each is (for a reason's text)."""
    agreement, psi = policy.min_agreement, policy.max_psi
    said_agreement, said_psi = f"{agreement:.0%}", f"{psi:g}"
    if foreseen is not None and foreseen.agreement - policy.agreement_margin < agreement:
        agreement = max(foreseen.agreement - policy.agreement_margin, 0.0)
        said_agreement = f"{agreement:.0%} (its test comparison foresaw {foreseen.agreement:.1%}, less {policy.agreement_margin:.0%})"
    if foreseen is not None and foreseen.psi > 0:
        psi += foreseen.psi
        said_psi = f"{psi:.3f} (its test comparison foresaw {foreseen.psi:.3f}, plus {policy.max_psi:g})"
    return agreement, psi, said_agreement, said_psi


def judge(
    version: str, stage: str, share: float, started_at: datetime, now: datetime, signals: Signals, policy: RolloutPolicy,
    foreseen: Foreseen | None = None,
) -> Step:
    """ROLLBACK when a signal breaks the policy, ADVANCE when healthy after the stage's time and requests, else WAIT.
    Agreement and PSI are judged against what the promotion's test comparison `foreseen`, where it was kept."""
    least_agreement, most_psi, said_agreement, said_psi = limits(policy, foreseen)
    problems = []
    # Failures are judged from the first request: more than a whole stage may have ends the candidate at once.
    if signals.errors > policy.max_error_share * max(signals.requests, policy.min_requests):
        problems.append(f"it failed {signals.errors:,} of {signals.requests:,} requests ({signals.error_share:.1%}), more than {policy.max_error_share:.1%}")
    if signals.live:
        problems.append(signals.live)
    if signals.requests >= policy.min_requests:
        if signals.latency_p95_ms is not None and signals.latency_p95_ms > policy.max_candidate_ms:
            problems.append(f"its p95 latency {signals.latency_p95_ms:.1f} ms is above {policy.max_candidate_ms:g} ms")
        if signals.agreement is not None and signals.agreement < least_agreement:
            problems.append(f"it agrees with production on {signals.agreement:.1%} of {signals.compared:,} shadowed encounters, below {said_agreement}")
        # Fewer of production's probabilities than a stage's requests make the index noise, not evidence.
        if signals.psi is not None and signals.reference >= policy.min_requests and signals.psi > most_psi:
            problems.append(f"its probabilities shifted against production's: PSI {signals.psi:.3f} above {said_psi}")
    here = _where(stage, share)
    if problems:
        return Step(ROLLBACK, None, 0.0, f"v{version} rolled back from {here}: {'; '.join(problems)}.")
    elapsed = (now - started_at).total_seconds()
    waiting = []
    if elapsed < policy.stage_seconds:
        waiting.append(f"{elapsed:.0f} of {policy.stage_seconds:.0f} s")
    if signals.requests < policy.min_requests:
        waiting.append(f"{signals.requests:,} of {policy.min_requests:,} requests")
    if waiting:
        return Step(WAIT, stage, share, f"v{version} stays in {here}: {' and '.join(waiting)} so far; {signals.describe()}.")
    after, after_share = next_stage(stage, share, policy.steps)
    return Step(
        ADVANCE, after, after_share,
        f"v{version} advances from {here} to {_where(after, after_share)}: healthy for {elapsed:.0f} s on {signals.describe()}.",
    )  # fmt: skip


def live_finding(figures: pl.DataFrame, version: str, production: str | None, limits: Limits | None = None) -> str | None:
    """Why the candidate's matured live performance (rows of `live_performance`) says roll back, or None: clearly
    worse live than production, or below its own test ROC-AUC by more than the error margin."""
    limits = limits or Limits()
    if figures.is_empty():
        return None
    findings = []
    if production is not None and (worse := clearly_worse(figures, version, production, limits)):
        findings.append(worse)
    judged = judge_discrimination(figures, version, limits)
    if judged.level == "error":
        findings.extend(judged.findings)
    return "; ".join(findings) or None


def assess(
    registry: ModelRegistry,
    read: Callable[[datetime | None], pl.DataFrame],
    live_figures: pl.DataFrame,
    policy: RolloutPolicy,
    now: datetime,
) -> tuple[Rollout, Signals, Step] | None:
    """The candidate in rollout, its signals and what they call for, or None when no rollout is under way; `read`
    gives the prediction log's ROLLOUT_COLUMNS since a time, `live_figures` the rows of `live_performance`."""
    from readmission_platform.lib.registry import decision_threshold

    current = registry.rollout()
    if current is None:
        return None
    production = registry.production()
    rows = read(current.started_at)
    candidate = registry.version(current.version)
    threshold = decision_threshold(candidate)
    signals = measure(rows, current.stage, current.version, threshold)
    if current.stage == CANARY and current.started_at is not None and signals.reference < policy.min_requests:
        # At a large share production answers few requests in the stage (at 100 %, only those before the workers
        # followed): its answers over the stage's length before it began are the comparison too.
        since = current.started_at - timedelta(seconds=policy.stage_seconds)
        before = read(since).filter(pl.col("predicted_at") < current.started_at)
        signals = measure(rows, current.stage, current.version, threshold, before)
    signals = replace(signals, live=live_finding(live_figures, current.version, str(production.version) if production else None))
    foreseen = Foreseen.from_tags(candidate.tags)
    step = judge(current.version, current.stage, current.share, current.started_at or now, now, signals, policy, foreseen)
    return current, signals, step


def by_hand(current: Rollout, action: str, reason: str, steps: tuple[float, ...]) -> Step:
    """The step a person asks for: ADVANCE to the next stage, or ROLLBACK (abort), with their reason."""
    here = _where(current.stage, current.share)
    if action == ADVANCE:
        stage, share = next_stage(current.stage, current.share, steps)
        return Step(ADVANCE, stage, share, f"v{current.version} advanced by hand from {here} to {_where(stage, share)}: {reason}")
    if action == ROLLBACK:
        return Step(ROLLBACK, None, 0.0, f"v{current.version} aborted by hand in {here}: {reason}")
    raise ValueError(f"action {action!r} is not one a person takes; expected {ADVANCE!r} or {ROLLBACK!r}")


def act(registry: ModelRegistry, current: Rollout, step: Step, signals: Signals | None, now: datetime, *, action: str | None = None) -> dict:
    """Carry out `step` on the registry (set_canary, finish_rollout or end_rollout) and return its row of
    promotion_decisions; `action` names a rollback a person asked for (ROLLOUT_ABORTED)."""
    if step.action == WAIT:
        raise ValueError(f"a {WAIT!r} step changes nothing; only {ADVANCE!r} and {ROLLBACK!r} are carried out")
    # On the candidate judged only: another may have taken its place since (`RolloutMoved`, nothing done).
    if step.action == ROLLBACK:
        registry.end_rollout(reason=step.reason, version=current.version, when=now)
    elif step.stage == PRODUCTION:
        registry.finish_rollout(reason=step.reason, version=current.version, when=now)
    else:
        registry.set_canary(step.share, version=current.version, when=now)
    production = registry.production()
    return rollout_row(
        action=action or (ROLLOUT_ROLLED_BACK if step.action == ROLLBACK else ROLLOUT_ADVANCED),
        candidate=current.version,
        production=str(production.version) if production is not None else None,
        stage=step.stage,
        share=step.share if step.stage == CANARY else None,
        reason=step.reason,
        signals=signals.as_json() if signals is not None else "",
        now=now,
    )
