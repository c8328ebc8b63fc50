"""The tables `readmission status` prints, read from a real warehouse, MLflow store and Dagster instance."""

from __future__ import annotations

from datetime import UTC, datetime

import dagster as dg
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


def run_partitioned_jobs(instance) -> None:
    """A batch ingested, a file of outcomes ingested and a day of serving drift measured, each by a job of the
    platform's name, with assets and checks of the platform's names that report as the real ones do."""

    batches = dg.DynamicPartitionsDefinition(name="batches")
    outcome_files = dg.DynamicPartitionsDefinition(name="outcome_files")
    days = dg.DailyPartitionsDefinition(start_date="2026-12-01")

    @dg.asset(partitions_def=batches)
    def raw_batches() -> dg.MaterializeResult:
        return dg.MaterializeResult(metadata={"dagster/row_count": 100, "rejected_rows": 2})

    @dg.asset_check(asset=raw_batches, partitions_def=batches)
    def check_raw_batches_ids_unique() -> dg.AssetCheckResult:
        return dg.AssetCheckResult(passed=True)

    @dg.asset(partitions_def=outcome_files)
    def outcomes() -> dg.MaterializeResult:
        return dg.MaterializeResult(metadata={"dagster/row_count": 40, "readmitted": 5, "set_aside": 3})

    @dg.asset_check(asset=outcomes, partitions_def=outcome_files)
    def check_outcomes_set_aside() -> dg.AssetCheckResult:
        return dg.AssetCheckResult(passed=False, severity=dg.AssetCheckSeverity.WARN, description="3 outcomes set aside")

    @dg.asset(partitions_def=days)
    def serving_drift() -> dg.MaterializeResult:
        return dg.MaterializeResult(metadata={"predictions": 0, "status": "no predictions"})

    defs = dg.Definitions(
        assets=[raw_batches, outcomes, serving_drift],
        asset_checks=[check_raw_batches_ids_unique, check_outcomes_set_aside],
        jobs=[
            dg.define_asset_job("ingest_batch", selection=dg.AssetSelection.assets(raw_batches)),
            dg.define_asset_job("ingest_outcomes", selection=dg.AssetSelection.assets(outcomes)),
            dg.define_asset_job("serving_drift_daily", selection=dg.AssetSelection.assets(serving_drift)),
        ],
    )
    instance.add_dynamic_partitions(batches.name, ["batch_0001"])
    instance.add_dynamic_partitions(outcome_files.name, ["outcomes_0001"])
    runs = {"ingest_batch": "batch_0001", "ingest_outcomes": "outcomes_0001", "serving_drift_daily": "2026-12-03"}
    for job, partition in runs.items():
        assert defs.resolve_job_def(job).execute_in_process(instance=instance, partition_key=partition).success


def test_only_ingested_batches_are_batches_and_files_of_outcomes_get_their_own_table(tmp_path, monkeypatch, capsys):
    from readmission_platform.cli.main import summarize
    from readmission_platform.cli.report import latest_batch_reports

    (tmp_path / "dagster").mkdir()
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "dagster"))
    with dg.DagsterInstance.get() as instance:
        run_partitioned_jobs(instance)
        assert [r.batch_id for r in latest_batch_reports(instance)] == ["batch_0001"]

    ok = summarize(Settings.from_env({"READMISSION_HOME": str(tmp_path)}))

    out = capsys.readouterr().out
    batches = out[out.index("batch  ") : out.index("no model trained yet")]
    assert "outcomes_0001" not in batches and "2026-12-03" not in batches
    assert "checks per batch: check_raw_batches_ids_unique\n" in batches
    assert "every check passed on every batch" in batches
    files = out[out.index("outcome file  ") : out.index("live performance")]
    assert files.splitlines()[2].split()[:6] == ["outcomes_0001", "success", "40", "5", "3", "0/1"]
    assert "  outcomes_0001 check_outcomes_set_aside: warn — 3 outcomes set aside" in files
    assert ok
