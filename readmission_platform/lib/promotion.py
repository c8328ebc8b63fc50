"""Whether a newly registered model may replace the production one: quality gates, then challenger against champion.

Both models must be scored on the same test patients; the caller guarantees that, this module only compares numbers.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime

import polars as pl

# Headline test metrics copied into a decision's warehouse row, so every row has the same columns.
ROW_METRICS = ("roc_auc", "pr_auc", "brier", "base_rate_brier", "log_loss")
PROMOTED, NOT_PROMOTED, ROLLED_BACK = "promoted", "not_promoted", "rolled_back"
# What live performance made the platform do (`defs/outcomes/sensors.py`).
RETRAIN_REQUESTED, ROLLBACK_PROPOSED = "retrain_requested", "rollback_proposed"

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
}


@dataclass(frozen=True)
class Gates:
    """Limits a challenger must meet before it may serve; a weak subgroup only warns."""

    min_test_roc_auc: float = 0.62
    require_brier_below_base_rate: bool = True
    subgroup_auc_floor: float = 0.55
    # The challenger's test ROC-AUC must exceed the champion's by more than this; 0.0 means any improvement.
    margin: float = 0.0


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
) -> Decision:
    """Promote the challenger if it passes the gates and, when there is a champion, beats its test ROC-AUC by more
    than `gates.margin`; `subgroups` (the challenger's subgroup report) only adds warnings."""
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
    )
