"""The tables `readmission status` prints, read from a real warehouse and MLflow store."""

from __future__ import annotations

from datetime import UTC, datetime

import polars as pl

from readmission_platform.cli.report import render_models
from readmission_platform.lib.promotion import (
    DECISION_SCHEMA, PROMOTED, ROLLOUT_ADVANCED, record_decisions, rollback_row, rollout_row,
)  # fmt: skip
from readmission_platform.lib.warehouse import open_warehouse
from readmission_platform.settings import Settings


def test_every_row_names_the_version_it_is_about(tmp_path):
    settings = Settings.from_env({"READMISSION_HOME": str(tmp_path)})
    promoted = dict.fromkeys(DECISION_SCHEMA) | {
        "decided_at": datetime(2026, 12, 4, 10, tzinfo=UTC), "action": PROMOTED, "promoted": True,
        "reason": "Version 2 is better.", "challenger_version": "2", "champion_version": "1", "production_version": "1",
        "challenger_test_roc_auc": 0.6856, "challenger_test_brier": 0.0940,
    }  # fmt: skip
    advanced = rollout_row(
        action=ROLLOUT_ADVANCED, candidate="2", production="1", stage="canary", share=0.5, reason="v2 advances",
        signals="{}", now=datetime(2026, 12, 4, 11, tzinfo=UTC),
    )  # fmt: skip
    rolled_back = rollback_row(replaced="2", restored="1", reason="worse live", now=datetime(2026, 12, 4, 12, tzinfo=UTC))
    record_decisions(open_warehouse(settings.warehouse_url), pl.DataFrame([promoted, advanced, rolled_back], schema=DECISION_SCHEMA))

    rows = render_models(settings).splitlines()

    assert rows[0].split()[:5] == ["decided", "at", "action", "version", "test"]
    assert rows[1].split()[2:6] == ["promoted", "v2", "0.686", "0.0940"]
    assert rows[2].split()[2:6] == ["rollout_advanced", "v2", "-", "-"]  # the candidate, not "v-"
    assert rows[3].split()[2:6] == ["rolled_back", "v2", "-", "-"]  # the version production left
    assert rows[4] == "1 model version registered; production: none"
