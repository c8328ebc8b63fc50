"""Whether a newly registered model may replace the production one: quality gates, then challenger against champion.

Both models must be scored on the same test patients; the caller guarantees that, this module only compares numbers.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime

import polars as pl

from readmission_platform.lib.paired import PairedComparison

# Headline test metrics copied into a decision's warehouse row, so every row has the same columns.
ROW_METRICS = ("roc_auc", "pr_auc", "brier", "base_rate_brier", "log_loss")
PROMOTED, NOT_PROMOTED, ROLLED_BACK = "promoted", "not_promoted", "rolled_back"
# What live performance made the platform do (`defs/outcomes/sensors.py`).
RETRAIN_REQUESTED, ROLLBACK_PROPOSED = "retrain_requested", "rollback_proposed"
# What the rollout of a promoted challenger did (`lib/rollout.py`, `defs/promotion/sensors.py`, `readmission rollout`).
ROLLOUT_ADVANCED, ROLLOUT_ROLLED_BACK, ROLLOUT_ABORTED = "rollout_advanced", "rollout_rolled_back", "rollout_aborted"
# The paired comparison of challenger and production on the same test patients (`lib/paired.py`), a row's columns.
EVIDENCE_COLUMNS = (
    "roc_auc_difference", "roc_auc_difference_lower", "roc_auc_difference_upper", "roc_auc_p_value",
    "delong_z", "delong_p_value",
    "brier_difference", "brier_difference_lower", "brier_difference_upper", "brier_p_value",
)  # fmt: skip

# One row per decision and per rollback; null where a row has no such thing (no champion, no challenger).
DECISION_SCHEMA: dict[str, pl.DataType] = {
    "decided_at": pl.Datetime("us", "UTC"),
    "action": pl.String(),
    "promoted": pl.Boolean(),
    "reason": pl.String(),
    "challenger_version": pl.String(),
    "champion_version": pl.String(),
    "production_version": pl.String(),
    **{f"challenger_test_{name}": pl.Float64() for name in ROW_METRICS},
    **{f"champion_test_{name}": pl.Float64() for name in ROW_METRICS},
    "gate_failures": pl.String(),
    "warnings": pl.String(),
    # Filled in by the orchestrator that made the decision; null for a rollback from the command line.
    "dagster_run_id": pl.String(),
    # How challenger and production were compared, and the figures (null without a production to compare with).
    "comparison": pl.String(),
    **{name: pl.Float64() for name in EVIDENCE_COLUMNS},
    # Rollout: the candidate a row is about, the stage and canary share it is at after the row, and the live signals.
    "candidate_version": pl.String(),
    "rollout_stage": pl.String(),
    "rollout_share": pl.Float64(),
    "signals": pl.String(),
}

DECISIONS = "promotion_decisions"


def record_decisions(store, rows: pl.DataFrame) -> None:
    """Append decision rows (DECISION_SCHEMA) to `promotion_decisions` in the warehouse `store`. A table made by an
    earlier version, which lacks the columns added since, is first widened with them (NULL in its rows, every row
    kept), so an upgraded platform goes on recording where it left off."""
    store.add_columns(DECISIONS, DECISION_SCHEMA)
    store.append(DECISIONS, DECISION_SCHEMA, rows.select(list(DECISION_SCHEMA)).cast(DECISION_SCHEMA))


@dataclass(frozen=True)
class Gates:
    """Limits a challenger must meet before it may serve; a weak subgroup only warns."""

    min_test_roc_auc: float = 0.62
    require_brier_below_base_rate: bool = True
    subgroup_auc_floor: float = 0.55
    # The challenger's test ROC-AUC must exceed the champion's by more than this; 0.0 means any improvement. With a
    # paired comparison, the lower end of the difference's interval must exceed it.
    margin: float = 0.0
    # The level of the paired comparison's intervals: "better with this confidence".
    confidence: float = 0.95
    # Non-inferiority: a challenger whose ROC-AUC interval stays above -this, and whose Brier score is lower with
    # `confidence` (its interval below 0), is promoted too.
    non_inferiority_margin: float = 0.01


@dataclass(frozen=True)
class Decision:
    """The outcome of one promotion decision, with the numbers and sentences behind it."""

    promoted: bool
    reason: str
    challenger_version: str
    champion_version: str | None
    challenger_metrics: Mapping[str, float]
    champion_metrics: Mapping[str, float] | None
    gate_failures: tuple[str, ...]
    warnings: tuple[str, ...]
    decided_at: datetime
    evidence: PairedComparison | None = None

    def as_row(self) -> dict[str, object]:
        """A flat row of DECISION_SCHEMA; the champion's metrics are None when nothing was in production."""
        champion = self.champion_metrics or {}
        return dict.fromkeys(DECISION_SCHEMA) | {
            "decided_at": self.decided_at,
            "action": PROMOTED if self.promoted else NOT_PROMOTED,
            "promoted": self.promoted,
            "reason": self.reason,
            "challenger_version": self.challenger_version,
            "champion_version": self.champion_version,
            "production_version": self.challenger_version if self.promoted else self.champion_version,
            **{f"challenger_test_{name}": _optional(self.challenger_metrics, name) for name in ROW_METRICS},
            **{f"champion_test_{name}": _optional(champion, name) for name in ROW_METRICS},
            "gate_failures": "; ".join(self.gate_failures),
            "warnings": "; ".join(self.warnings),
            **(evidence_figures(self.evidence) if self.evidence is not None else {}),
        }


def evidence_figures(evidence: PairedComparison) -> dict[str, object]:
    """The paired comparison as `comparison` and EVIDENCE_COLUMNS of a decision row (and MLflow tags)."""
    auc, brier, test = evidence.roc_auc, evidence.brier, evidence.delong
    values = (auc.difference, auc.lower, auc.upper, auc.p_value, test.z, test.p_value,
              brier.difference, brier.lower, brier.upper, brier.p_value)  # fmt: skip
    return {"comparison": evidence.method} | {name: float(v) for name, v in zip(EVIDENCE_COLUMNS, values, strict=True)}


def rollout_row(
    *, action: str, candidate: str, production: str | None, stage: str | None, share: float | None, reason: str,
    signals: str, now: datetime,
) -> dict[str, object]:  # fmt: skip
    """A row of DECISION_SCHEMA recording one step of a candidate's rollout (`stage` and `share` after the step; None
    when it left the rollout); `challenger_version` stays null, so live performance never mistakes it for a decision."""
    if action not in (ROLLOUT_ADVANCED, ROLLOUT_ROLLED_BACK, ROLLOUT_ABORTED):
        raise ValueError(f"action {action!r} is not a rollout step; expected {ROLLOUT_ADVANCED}, {ROLLOUT_ROLLED_BACK} or {ROLLOUT_ABORTED}")
    return dict.fromkeys(DECISION_SCHEMA) | {
        "decided_at": _aware(now),
        "action": action,
        "reason": reason,
        "production_version": production,
        "gate_failures": "",
        "warnings": "",
        "candidate_version": str(candidate),
        "rollout_stage": stage,
        "rollout_share": share,
        "signals": signals,
    }


def rollback_row(*, replaced: str, restored: str, reason: str, now: datetime) -> dict[str, object]:
    """A row of DECISION_SCHEMA recording that `production` went back from `replaced` to `restored`."""
    return dict.fromkeys(DECISION_SCHEMA) | {
        "decided_at": _aware(now),
        "action": ROLLED_BACK,
        "reason": f"Production rolled back from v{replaced} to v{restored}: {reason}",
        "champion_version": str(replaced),
        "production_version": str(restored),
        "gate_failures": "",
        "warnings": "",
    }


def live_action_row(*, action: str, version: str, replaced: str | None, reason: str, now: datetime) -> dict[str, object]:
    """A row of DECISION_SCHEMA recording what live performance of the production `version` led to (`action`)."""
    if action not in (RETRAIN_REQUESTED, ROLLBACK_PROPOSED):
        raise ValueError(f"action {action!r} is not one live performance takes; expected {RETRAIN_REQUESTED} or {ROLLBACK_PROPOSED}")
    return dict.fromkeys(DECISION_SCHEMA) | {
        "decided_at": _aware(now),
        "action": action,
        "reason": reason,
        "champion_version": replaced,
        "production_version": str(version),
        "gate_failures": "",
        "warnings": "",
    }


def _optional(metrics: Mapping[str, float], name: str) -> float | None:
    return float(metrics[name]) if name in metrics else None


def _aware(now: datetime) -> datetime:
    if now.tzinfo is None:
        raise ValueError(f"time {now.isoformat()} has no time zone; pass a timezone-aware datetime")
    return now


def _metric(metrics: Mapping[str, float], name: str, whose: str) -> float:
    if name not in metrics:
        raise KeyError(f"the {whose} metrics lack '{name}'; expected the test metrics of metrics.evaluate")
    return float(metrics[name])


def _shown(value: float, other: float) -> str:
    """`value` with three decimals, or more when three would print two different numbers alike."""
    digits = 3
    while digits < 6 and value != other and f"{value:.{digits}f}" == f"{other:.{digits}f}":
        digits += 1
    return f"{value:.{digits}f}"


def _limit(value: float) -> str:
    """A configured limit with three decimals, or as many as it has, up to six."""
    digits = 3
    while digits < 6 and round(value, digits) != value:
        digits += 1
    return f"{value:.{digits}f}"


def gate_failures(metrics: Mapping[str, float], gates: Gates) -> list[str]:
    """Why a model with these test metrics may not serve; empty when it passes every blocking gate."""
    failures = []
    roc_auc = _metric(metrics, "roc_auc", "test")
    # Written as `not >=` so that a NaN score fails the gate instead of slipping through.
    if not roc_auc >= gates.min_test_roc_auc:
        failures.append(
            f"test ROC-AUC {_shown(roc_auc, gates.min_test_roc_auc)} is below the gate {gates.min_test_roc_auc}"
        )
    if gates.require_brier_below_base_rate:
        brier = _metric(metrics, "brier", "test")
        base = _metric(metrics, "base_rate_brier", "test")
        if not brier < base:
            failures.append(
                f"test Brier {_shown(brier, base)} is not below the base-rate Brier {_shown(base, brier)} "
                "of predicting the training rate for everyone"
            )
    return failures


def gate_warnings(subgroups: pl.DataFrame | Iterable[Mapping], gates: Gates) -> list[str]:
    """Subgroups whose test ROC-AUC is below the floor; groups whose AUC is None (one class only) are skipped.

    Rows hold `group`, `rows`, `roc_auc` as in `metrics.subgroup_report`, and `by` (the attribute) when reports of
    several attributes are stacked, as `evaluation.subgroup_tables` does.
    """
    rows = subgroups.iter_rows(named=True) if isinstance(subgroups, pl.DataFrame) else subgroups
    return [
        f"subgroup {row['by'] + '=' if row.get('by') else ''}{row['group']} ({row['rows']:,} rows) has test ROC-AUC "
        f"{_shown(row['roc_auc'], gates.subgroup_auc_floor)}, below the floor {gates.subgroup_auc_floor}"
        for row in rows
        if row["roc_auc"] is not None and not row["roc_auc"] >= gates.subgroup_auc_floor
    ]


def decide(
    challenger_version: str,
    challenger_metrics: Mapping[str, float],
    champion_version: str | None,
    champion_metrics: Mapping[str, float] | None,
    gates: Gates,
    now: datetime,
    subgroups: pl.DataFrame | Iterable[Mapping] = (),
    evidence: PairedComparison | None = None,
) -> Decision:
    """Promote the challenger if it passes the gates and, when there is a champion, is better on the evidence;
    `subgroups` (the challenger's subgroup report) only adds warnings.

    With `evidence` (challenger against champion on the same test patients, `paired.compare`): better means the
    ROC-AUC difference's interval lies above `gates.margin`, or above -`gates.non_inferiority_margin` with the Brier
    difference's interval below 0. Without it (a caller that cannot pair the scores) the point estimates are compared.
    """
    if (champion_version is None) != (champion_metrics is None):
        raise ValueError(
            f"champion_version is {champion_version!r} but champion_metrics is "
            f"{'missing' if champion_metrics is None else 'given'}; pass both, or neither when nothing is in production"
        )
    if champion_version is not None and str(champion_version) == str(challenger_version):
        raise ValueError(
            f"challenger and champion are both version {challenger_version}; the challenger must be a newly "
            "registered version"
        )
    failures = gate_failures(challenger_metrics, gates)
    challenger_auc = _metric(challenger_metrics, "roc_auc", "challenger")
    if failures:
        promoted = False
        stays = f" Production stays at v{champion_version}." if champion_version is not None else ""
        reason = f"Version {challenger_version} is not promoted: {'; '.join(failures)}.{stays}"
    elif champion_version is None:
        promoted = True
        reason = (
            f"Version {challenger_version} becomes the first production model: it passes every gate "
            f"(test ROC-AUC {_shown(challenger_auc, gates.min_test_roc_auc)}, gate {gates.min_test_roc_auc})."
        )
    elif evidence is not None:
        promoted, reason = _judged_on_evidence(challenger_version, champion_version, evidence, gates)
    else:
        champion_auc = _metric(champion_metrics, "roc_auc", "champion")
        gain = challenger_auc - champion_auc
        # Rounded so that float noise in a difference of two AUCs cannot decide a tie with the margin.
        promoted = round(gain, 9) > gates.margin
        if promoted:
            reason = (
                f"Version {challenger_version} replaces production v{champion_version}: its test ROC-AUC "
                f"{_shown(challenger_auc, champion_auc)} beats {_shown(champion_auc, challenger_auc)} by "
                f"{_shown(gain, gates.margin)}, more than the margin {_limit(gates.margin)}, and it passes every gate."
            )
        else:
            reason = (
                f"Version {challenger_version} is not promoted: challenger test ROC-AUC "
                f"{_shown(challenger_auc, champion_auc)} does not beat production v{champion_version}'s "
                f"{_shown(champion_auc, challenger_auc)} by more than {_limit(gates.margin)}."
            )
    return Decision(
        promoted=promoted,
        reason=reason,
        challenger_version=str(challenger_version),
        champion_version=None if champion_version is None else str(champion_version),
        challenger_metrics=dict(challenger_metrics),
        champion_metrics=None if champion_metrics is None else dict(champion_metrics),
        gate_failures=tuple(failures),
        warnings=tuple(gate_warnings(subgroups, gates)),
        decided_at=_aware(now),
        evidence=evidence,
    )


def _interval(difference, level: float) -> str:
    return (
        f"{difference.difference:+.4f} ({level:.0%} interval {difference.lower:+.4f} to {difference.upper:+.4f}, "
        f"p = {difference.p_value:.3g})"
    )


def _judged_on_evidence(
    challenger: str, champion: str, evidence: PairedComparison, gates: Gates
) -> tuple[bool, str]:
    """Superiority on ROC-AUC, or non-inferiority on ROC-AUC with a better Brier score, each at `gates.confidence`."""
    if abs(evidence.level - gates.confidence) > 1e-12:
        raise ValueError(f"the comparison's intervals are at {evidence.level}; the gates ask for {gates.confidence}")
    auc, brier = evidence.roc_auc, evidence.brier
    stated = (
        f"test ROC-AUC {auc.a:.4f} against {auc.b:.4f}, difference {_interval(auc, evidence.level)}; Brier "
        f"{brier.a:.4f} against {brier.b:.4f}, difference {_interval(brier, evidence.level)}; DeLong's test "
        f"z = {evidence.delong.z:.2f}, p = {evidence.delong.p_value:.3g}; {evidence.method}"
    )
    if auc.lower > gates.margin:
        return True, (
            f"Version {challenger} is better than production v{champion} with {evidence.level:.0%} confidence (its "
            f"ROC-AUC difference's interval lies above {_limit(gates.margin)}) and passes every gate: {stated}."
        )
    if auc.lower > -gates.non_inferiority_margin and brier.upper < 0:
        return True, (
            f"Version {challenger} is non-inferior to production v{champion} (its ROC-AUC difference's interval lies "
            f"above -{_limit(gates.non_inferiority_margin)}) and better calibrated (its Brier difference's interval "
            f"lies below 0), with {evidence.level:.0%} confidence, and passes every gate: {stated}."
        )
    return False, (
        f"Version {challenger} is not promoted: it is neither better than production v{champion} with "
        f"{evidence.level:.0%} confidence (ROC-AUC difference's interval above {_limit(gates.margin)}) nor "
        f"non-inferior within {_limit(gates.non_inferiority_margin)} and better on Brier: {stated}."
    )
