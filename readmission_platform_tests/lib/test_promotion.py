import math
from datetime import UTC, datetime

import polars as pl
import pytest

from readmission_platform.lib.promotion import (
    DECISION_SCHEMA,
    Gates,
    decide,
    gate_failures,
    gate_warnings,
    rollback_row,
)

NOW = datetime(2024, 3, 1, 12, 0, tzinfo=UTC)
GATES = Gates()


def scores(roc_auc: float, brier: float = 0.095, base_rate_brier: float = 0.100) -> dict[str, float]:
    """Test metrics shaped like metrics.evaluate's, for a model with this ROC-AUC and Brier."""
    return {
        "rows": 20_000.0,
        "roc_auc": roc_auc,
        "pr_auc": 0.21,
        "brier": brier,
        "base_rate_brier": base_rate_brier,
        "log_loss": 0.33,
        "threshold": 0.14,
    }


def test_better_challenger_is_promoted():
    decision = decide("4", scores(0.680), "3", scores(0.671), GATES, NOW)

    assert decision.promoted
    assert decision.reason.startswith("Version 4 replaces production v3: its test ROC-AUC 0.680 beats 0.671 by 0.009")
    assert decision.gate_failures == ()
    assert decision.champion_version == "3"


def test_worse_challenger_is_not_promoted():
    decision = decide("4", scores(0.664), "3", scores(0.671), GATES, NOW)

    assert not decision.promoted
    assert decision.reason == (
        "Version 4 is not promoted: "
        "challenger test ROC-AUC 0.664 does not beat production v3's 0.671 by more than 0.000."
    )


def test_equal_challenger_is_not_promoted():
    decision = decide("4", scores(0.671), "3", scores(0.671), GATES, NOW)

    assert not decision.promoted
    assert "does not beat production v3's 0.671" in decision.reason


def test_margin_must_be_exceeded():
    gates = Gates(margin=0.01)

    assert not decide("4", scores(0.680), "3", scores(0.671), gates, NOW).promoted
    promoted = decide("4", scores(0.682), "3", scores(0.671), gates, NOW)
    assert promoted.promoted
    assert "more than the margin 0.010" in promoted.reason


def test_numbers_that_round_alike_are_shown_with_more_decimals():
    decision = decide("4", scores(0.6714), "3", scores(0.6712), Gates(margin=0.0005), NOW)

    assert not decision.promoted
    assert "ROC-AUC 0.6714 does not beat production v3's 0.6712 by more than 0.0005" in decision.reason


def test_roc_auc_gate_blocks_even_a_better_challenger():
    decision = decide("4", scores(0.601), "3", scores(0.590), GATES, NOW)

    assert not decision.promoted
    assert decision.gate_failures == ("test ROC-AUC 0.601 is below the gate 0.62",)
    assert decision.reason == (
        "Version 4 is not promoted: test ROC-AUC 0.601 is below the gate 0.62. Production stays at v3."
    )


def test_brier_gate_blocks_even_a_better_challenger():
    decision = decide("4", scores(0.700, brier=0.105, base_rate_brier=0.100), "3", scores(0.671), GATES, NOW)

    assert not decision.promoted
    assert decision.gate_failures == (
        "test Brier 0.105 is not below the base-rate Brier 0.100 of predicting the training rate for everyone",
    )


def test_brier_gate_can_be_switched_off():
    metrics = scores(0.700, brier=0.105, base_rate_brier=0.100)

    assert gate_failures(metrics, Gates(require_brier_below_base_rate=False)) == []


def test_nan_roc_auc_fails_the_gate():
    assert gate_failures(scores(math.nan), GATES) == ["test ROC-AUC nan is below the gate 0.62"]


def test_first_model_is_promoted_when_it_passes_the_gates():
    decision = decide("1", scores(0.650), None, None, GATES, NOW)

    assert decision.promoted
    assert decision.champion_version is None
    assert decision.reason == (
        "Version 1 becomes the first production model: it passes every gate (test ROC-AUC 0.650, gate 0.62)."
    )


def test_first_model_is_not_promoted_when_it_fails_a_gate():
    decision = decide("1", scores(0.610, brier=0.12), None, None, GATES, NOW)

    assert not decision.promoted
    assert len(decision.gate_failures) == 2
    assert decision.reason.startswith("Version 1 is not promoted: test ROC-AUC 0.610 is below the gate 0.62; test Brier")
    assert "Production stays" not in decision.reason


def test_weak_subgroups_warn_without_blocking():
    subgroups = pl.DataFrame(
        {
            "by": ["race", "race", "race", "gender"],
            "group": ["Caucasian", "Asian", "Other", "Female"],
            "rows": [15_000, 120, 3, 10_000],
            "roc_auc": [0.68, 0.51, None, 0.549],
        },
        schema_overrides={"roc_auc": pl.Float64},
    )

    decision = decide("4", scores(0.680), "3", scores(0.671), GATES, NOW, subgroups=subgroups)

    assert decision.promoted
    assert decision.warnings == (
        "subgroup race=Asian (120 rows) has test ROC-AUC 0.510, below the floor 0.55",
        "subgroup gender=Female (10,000 rows) has test ROC-AUC 0.549, below the floor 0.55",
    )


def test_gate_warnings_take_plain_rows_of_one_attribute():
    rows = [{"group": "F", "rows": 10, "roc_auc": 0.549}, {"group": "M", "rows": 10, "roc_auc": 0.55}]

    assert gate_warnings(rows, GATES) == ["subgroup F (10 rows) has test ROC-AUC 0.549, below the floor 0.55"]


def test_rows_fill_the_decision_schema_with_or_without_a_champion():
    first = decide("1", scores(0.650), None, None, GATES, NOW).as_row()
    later = decide("2", scores(0.601), "1", scores(0.650), GATES, NOW).as_row()
    rollback = rollback_row(replaced="2", restored="1", reason="alerts doubled", now=NOW)

    for row in (first, later, rollback):
        assert row.keys() == DECISION_SCHEMA.keys()
        assert all(value is None or isinstance(value, str | float | bool | datetime) for value in row.values()), row
    assert first | {"challenger_test_roc_auc": None} == {
        **dict.fromkeys(DECISION_SCHEMA),
        "decided_at": NOW,
        "action": "promoted",
        "promoted": True,
        "reason": first["reason"],
        "challenger_version": "1",
        "production_version": "1",
        "challenger_test_pr_auc": 0.21,
        "challenger_test_brier": 0.095,
        "challenger_test_base_rate_brier": 0.100,
        "challenger_test_log_loss": 0.33,
        "gate_failures": "",
        "warnings": "",
    }
    assert first["challenger_test_roc_auc"] == 0.650
    assert (later["action"], later["promoted"], later["production_version"]) == ("not_promoted", False, "1")
    assert (later["champion_test_roc_auc"], later["challenger_test_roc_auc"]) == (0.650, 0.601)
    assert later["gate_failures"] == "test ROC-AUC 0.601 is below the gate 0.62"
    assert rollback["action"] == "rolled_back"
    assert (rollback["champion_version"], rollback["production_version"]) == ("2", "1")
    assert rollback["reason"] == "Production rolled back from v2 to v1: alerts doubled"
    table = pl.DataFrame([first, later, rollback], schema=DECISION_SCHEMA)
    assert table["decided_at"].to_list() == [NOW] * 3
    assert table["champion_test_roc_auc"].to_list() == [None, 0.650, None]


def test_decision_time_must_carry_a_time_zone():
    with pytest.raises(ValueError, match="has no time zone"):
        decide("1", scores(0.650), None, None, GATES, datetime(2024, 3, 1, 12, 0))


def test_champion_needs_both_version_and_metrics():
    with pytest.raises(ValueError, match="champion_version is '3' but champion_metrics is missing"):
        decide("4", scores(0.680), "3", None, GATES, NOW)


def test_challenger_must_differ_from_champion():
    with pytest.raises(ValueError, match="both version 3"):
        decide("3", scores(0.680), "3", scores(0.680), GATES, NOW)


def test_missing_metric_is_named():
    with pytest.raises(KeyError, match="the test metrics lack .roc_auc."):
        gate_failures({"brier": 0.1, "base_rate_brier": 0.11}, GATES)


def test_a_gain_equal_to_the_margin_is_not_enough_despite_float_noise():
    assert 0.681 - 0.671 > 0.01

    assert not decide("4", scores(0.681), "3", scores(0.671), Gates(margin=0.01), NOW).promoted
