"""`readmission rollout status|advance|abort`: where the candidate stands, and a person's step."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime

import polars as pl

from readmission_platform.settings import RolloutSettings, Settings


def _policy(rollout_settings: RolloutSettings):
    from readmission_platform.lib.rollout import RolloutPolicy

    return RolloutPolicy(
        steps=rollout_settings.steps, stage_seconds=rollout_settings.stage_seconds, min_requests=rollout_settings.min_requests
    )


def rollout(settings: Settings, action: str, reason: str | None, say: Callable[[str], None]) -> int:
    """Show the rollout (`status`), or advance or abort it by hand with `reason`, recorded in promotion_decisions."""
    from readmission_platform.lib import rollout as lib
    from readmission_platform.lib.predictions import read_predictions
    from readmission_platform.lib.promotion import DECISION_SCHEMA, ROLLOUT_ABORTED, record_decisions
    from readmission_platform.lib.registry import ModelRegistry
    from readmission_platform.lib.warehouse import open_warehouse

    registry = ModelRegistry(settings.mlflow_tracking_uri, settings.mlflow_artifact_location)
    warehouse = open_warehouse(settings.warehouse_url)
    policy = _policy(RolloutSettings.from_env())
    now = datetime.now(UTC)
    figures = warehouse.query("SELECT * FROM live_performance")
    assessed = lib.assess(registry, lambda since: read_predictions(settings.prediction_log_url, lib.ROLLOUT_COLUMNS, since=since), figures, policy, now)
    production = registry.production()
    serving = f"production v{production.version}" if production is not None else "no production model"
    if assessed is None:
        say(f"no candidate in shadow or canary; {serving}")
        return 0 if action == "status" else 2
    current, signals, step = assessed
    if action == "status":
        since = current.started_at.isoformat() if current.started_at else "an unknown time"
        share = f" answering {current.share:.0%} of requests" if current.stage == lib.CANARY else ""
        say(f"v{current.version} in {current.stage}{share} since {since}; {serving}")
        say(f"signals: {signals.describe()}")
        foreseen = lib.Foreseen.from_tags(registry.version(current.version).tags)
        *_, agreement, psi = lib.limits(policy, foreseen)
        origin = "" if foreseen else " (the policy's: no comparison was kept at its promotion)"
        say(f"limits: agreement at least {agreement}, PSI at most {psi}{origin}")
        say(f"next: {step.action} — {step.reason}")
        return 0
    if not reason or not reason.strip():
        raise ValueError(f"`rollout {action}` needs --reason: a sentence recorded on the version and in promotion_decisions")
    step = lib.by_hand(current, lib.ADVANCE if action == "advance" else lib.ROLLBACK, reason.strip(), policy.steps)
    row = lib.act(registry, current, step, signals, now, action=ROLLOUT_ABORTED if action == "abort" else None)
    record_decisions(warehouse, pl.DataFrame([row], schema=DECISION_SCHEMA))
    say(step.reason)
    return 0

