"""What the instance recorded for each batch (rows, rejections, drops and check results) and each file of outcomes."""

from __future__ import annotations

from dataclasses import dataclass, field

import dagster as dg
import polars as pl

from readmission_platform.defs import run_tags

FINISHED = {dg.DagsterRunStatus.SUCCESS, dg.DagsterRunStatus.FAILURE, dg.DagsterRunStatus.CANCELED}


@dataclass
class BatchReport:
    batch_id: str
    run_id: str
    status: str
    seconds: float | None
    materialized: dict[str, dict] = field(default_factory=dict)  # asset → metadata values
    checks: dict[str, tuple[str, str]] = field(default_factory=dict)  # check → (result, description)
    failure: str | None = None

    def value(self, asset: str, key: str):
        return self.materialized.get(asset, {}).get(key)


def _metadata(entries) -> dict:
    return {key: getattr(value, "value", value) for key, value in entries.items()}


def _failure_message(data) -> str:
    user = getattr(data, "user_failure_data", None)
    if user is not None and user.description:
        return user.description
    return data.error.message.strip() if data.error else "step failed"


def read_batch_report(instance: dg.DagsterInstance, run: dg.DagsterRun) -> BatchReport:
    stats = instance.get_run_stats(run.run_id)
    seconds = stats.end_time - stats.start_time if stats.start_time and stats.end_time else None
    report = BatchReport(run.tags[run_tags.PARTITION], run.run_id, run.status.value.lower(), seconds)
    wanted = {
        dg.DagsterEventType.ASSET_MATERIALIZATION,
        dg.DagsterEventType.ASSET_CHECK_EVALUATION,
        dg.DagsterEventType.STEP_FAILURE,
    }
    for entry in instance.all_logs(run.run_id, of_type=wanted):
        event = entry.dagster_event
        data = event.event_specific_data
        if event.event_type == dg.DagsterEventType.ASSET_MATERIALIZATION:
            report.materialized[data.materialization.asset_key.to_user_string()] = _metadata(
                data.materialization.metadata
            )
        elif event.event_type == dg.DagsterEventType.ASSET_CHECK_EVALUATION:
            result = "passed" if data.passed else ("warn" if data.severity == dg.AssetCheckSeverity.WARN else "FAILED")
            report.checks[data.check_name] = (result, data.description or "")
        elif report.failure is None:
            report.failure = f"{event.step_key}: {_failure_message(data)}"
    return report


def _newest_per_partition(instance: dg.DagsterInstance, job_name: str) -> list[BatchReport]:
    """The newest finished run of `job_name` for every partition it ran, in partition order."""
    newest: dict[str, dg.DagsterRun] = {}
    for run in instance.get_runs(dg.RunsFilter(job_name=job_name, statuses=list(FINISHED)), limit=1000):
        partition = run.tags.get(run_tags.PARTITION)
        if partition and partition not in newest:
            newest[partition] = run
    return [read_batch_report(instance, newest[key]) for key in sorted(newest)]


def latest_batch_reports(instance: dg.DagsterInstance) -> list[BatchReport]:
    """The newest finished `ingest_batch` run of every batch partition, in batch order. Other partitioned runs (a file
    of outcomes, a day of serving drift) are not batches."""
    from readmission_platform.defs.ingestion.sensors import ingest_batch_job

    return _newest_per_partition(instance, ingest_batch_job.name)


def latest_outcome_reports(instance: dg.DagsterInstance) -> list[BatchReport]:
    """The newest finished `ingest_outcomes` run of every file of outcomes, in file order."""
    from readmission_platform.defs.outcomes.sensors import ingest_outcomes_job

    return _newest_per_partition(instance, ingest_outcomes_job.name)


def _not_passed(reports: list[BatchReport]) -> list[str]:
    """Every check of the reports that did not pass, then every run's failure."""
    notes = [
        f"  {r.batch_id} {name}: {result} — {description}"
        for r in reports
        for name, (result, description) in sorted(r.checks.items())
        if result != "passed"
    ]
    return notes + [f"  {r.batch_id} run {r.run_id[:8]} failed — {r.failure}" for r in reports if r.failure]


def render(reports: list[BatchReport]) -> str:
    """The demo's summary: one row per batch, then every check that did not pass."""
    header = f"{'batch':<12}{'status':>9}{'raw rows':>10}{'rejected':>10}{'dropped†':>10}{'clean':>9}{'features':>10}{'checks':>10}{'secs':>7}"
    lines = [header, "-" * len(header)]
    totals = [0, 0, 0, 0, 0]
    for r in reports:
        dropped = sum(v or 0 for k, v in r.materialized.get("clean_batches", {}).items() if k.startswith("dropped_"))
        numbers = [
            r.value("raw_batches", "dagster/row_count") or 0,
            r.value("raw_batches", "rejected_rows") or 0,
            dropped,
            r.value("clean_batches", "dagster/row_count") or 0,
            r.value("features", "dagster/row_count") or 0,
        ]
        totals = [t + n for t, n in zip(totals, numbers)]
        passed = sum(result == "passed" for result, _ in r.checks.values())
        seconds = f"{r.seconds:.1f}" if r.seconds is not None else "-"
        lines.append(
            f"{r.batch_id:<12}{r.status:>9}"
            + "".join(f"{n:>{w},}" for n, w in zip(numbers, (10, 10, 10, 9, 10)))
            + f"{f'{passed}/{len(r.checks)}':>10}{seconds:>7}"
        )
    lines.append("-" * len(header))
    lines.append(f"{'total':<12}{'':>9}" + "".join(f"{n:>{w},}" for n, w in zip(totals, (10, 10, 10, 9, 10))))
    reasons: dict[str, int] = {}
    for r in reports:
        for key, value in r.materialized.get("clean_batches", {}).items():
            if key.startswith("dropped_"):
                reasons[key.removeprefix("dropped_")] = reasons.get(key.removeprefix("dropped_"), 0) + (value or 0)
    lines.append("† dropped: " + (", ".join(f"{reason} {count:,}" for reason, count in reasons.items()) or "none"))
    notes = _not_passed(reports)
    check_names = sorted({name for r in reports for name in r.checks})
    lines.append(f"checks per batch: {', '.join(check_names) or 'none ran'}")
    if notes:
        lines.extend(["checks not passed and failures:", *notes])
    else:
        lines.append("every check passed on every batch" if reports else "no batch has been ingested yet")
    return "\n".join(lines)


def render_not_ingested(batch_ids: list[str]) -> str:
    """The landed batches no finished ingestion run stands for, and what ingests them."""
    return (f"landed, not ingested yet (or being ingested): {', '.join(batch_ids)}; the landing sensor ingests "
            "them while a Dagster daemon runs on this instance (`readmission ui`, or `readmission demo`)")  # fmt: skip


def render_outcome_files(reports: list[BatchReport]) -> str:
    """One row per file of outcomes (`latest_outcome_reports`): outcomes stored, readmitted, set aside, its checks;
    then every check that did not pass and every failure."""
    if not reports:
        return "outcome files: none ingested yet"
    header = f"{'outcome file':<16}{'status':>9}{'outcomes':>10}{'readm.':>8}{'set aside':>11}{'checks':>8}{'secs':>7}"
    lines = [header, "-" * len(header)]
    for r in reports:
        numbers = [r.value("outcomes", key) or 0 for key in ("dagster/row_count", "readmitted", "set_aside")]
        passed = sum(result == "passed" for result, _ in r.checks.values())
        seconds = f"{r.seconds:.1f}" if r.seconds is not None else "-"
        lines.append(
            f"{r.batch_id:<16}{r.status:>9}" + "".join(f"{n:>{w},}" for n, w in zip(numbers, (10, 8, 11)))
            + f"{f'{passed}/{len(r.checks)}':>8}{seconds:>7}"
        )  # fmt: skip
    notes = _not_passed(reports)
    lines.extend(["checks not passed and failures:", *notes] if notes else ["every check passed on every file of outcomes"])
    return "\n".join(lines)


def render_models(settings) -> str:
    """Every promotion decision, rollout step and rollback, oldest first, and the version behind `production`. A row's
    `version` is the one it is about: the challenger of a decision, the candidate of a rollout step, the version a
    rollback replaced."""
    from readmission_platform.lib.registry import ModelRegistry
    from readmission_platform.lib.warehouse import open_warehouse

    decisions = open_warehouse(settings.warehouse_url).query("SELECT * FROM promotion_decisions ORDER BY decided_at")
    if not decisions.height:
        return "no model trained yet"
    lines = [f"{'decided at':<21}{'action':<19}{'version':>11}{'test AUC':>10}{'Brier':>8}{'production':>12}  reason"]
    for row in decisions.iter_rows(named=True):
        auc, brier = row["challenger_test_roc_auc"], row["challenger_test_brier"]
        about = row["challenger_version"] or row.get("candidate_version") or row["champion_version"]
        lines.append(
            f"{row['decided_at']:%Y-%m-%d %H:%M:%S}  {row['action']:<19}{'v' + str(about) if about else '-':>11}"
            f"{f'{auc:.3f}' if auc is not None else '-':>10}{f'{brier:.4f}' if brier is not None else '-':>8}"
            f"{'v' + str(row['production_version'] or '-'):>12}  {row['reason']}"
        )
    production = ModelRegistry(settings.mlflow_tracking_uri, settings.mlflow_artifact_location).production()
    versions = decisions.filter(pl.col("challenger_version").is_not_null())["challenger_version"].n_unique()
    lines.append(
        f"{versions} model version{'' if versions == 1 else 's'} registered; production: "
        + (f"v{production.version} ({production.tags.get('family', '?')})" if production else "none")
    )
    return "\n".join(lines)


def _interval(row: dict | None, digits: int = 3) -> str:
    if row is None or row["estimate"] is None:
        return "-"
    return f"{row['estimate']:.{digits}f} [{row['lower']:.{digits}f}–{row['upper']:.{digits}f}]"


def render_live(settings) -> str:
    """Each model version's live figures on the outcomes that came back, with 95 % intervals, beside its test figures."""
    from readmission_platform.lib.warehouse import open_warehouse

    figures = open_warehouse(settings.warehouse_url).query("SELECT * FROM live_performance")
    if not figures.height:
        return "live performance: no outcomes of served predictions yet (`readmission outcomes` lands the demo's)"
    lines = [
        "live performance (95 % intervals; test: the figure on the version's test patients at its promotion):",
        f"{'version':>8}{'outcomes':>10}{'readm.':>8}  {'ROC-AUC':<22}{'test':>6}  {'PR-AUC':<22}{'test':>6}  "
        f"{'Brier':<22}{'test':>7}  {'cal. slope':<22}{'cal. intercept':<25}{'flagged':<22}",
    ]
    ordered = figures.sort(pl.col("model_version").cast(pl.Int64, strict=False), maintain_order=True)
    for (version,), rows in ordered.group_by("model_version", maintain_order=True):
        by = {row["metric"]: row for row in rows.iter_rows(named=True)}

        def test(name: str, digits: int = 3) -> str:
            value = by.get(name, {}).get("test")
            return f"{value:.{digits}f}" if value is not None else "-"

        lines.append(
            f"{'v' + version:>8}{rows['outcomes'][0]:>10,}{rows['readmitted'][0]:>8,}  {_interval(by.get('roc_auc')):<22}"
            f"{test('roc_auc'):>6}  {_interval(by.get('pr_auc')):<22}{test('pr_auc'):>6}  {_interval(by.get('brier'), 4):<22}"
            f"{test('brier', 4):>7}  {_interval(by.get('calibration_slope'), 2):<22}"
            f"{_interval(by.get('calibration_intercept'), 2):<25}{_interval(by.get('positive_rate')):<22}"
        )
    return "\n".join(lines)


SERVING_DRIFT_DAYS = 7


def render_serving_drift(instance: dg.DagsterInstance, days: int = SERVING_DRIFT_DAYS) -> str:
    """The newest `serving_drift` measurement of each of the last `days` UTC days: predictions, the largest PSI and
    its movers, and the reference it was measured against."""
    found = instance.fetch_materializations(dg.AssetKey("serving_drift"), limit=50 * days).records
    newest: dict[str, dict] = {}
    for record in found:  # newest first
        materialization = record.asset_materialization
        if materialization.partition not in newest:
            newest[materialization.partition] = _metadata(materialization.metadata)
    if not newest:
        return "serving drift: not measured yet (serving_drift runs each UTC day at 00:15, or materialize a day in the UI)"
    lines = ["serving drift (PSI of each day's served predictions against the production model's newest training batch):"]
    for day in sorted(newest, reverse=True)[:days]:
        found = newest[day]
        if "max_psi" not in found:
            lines.append(f"  {day}  {found.get('predictions', 0):>8,} predictions  {found.get('status', 'not measured')}")
            continue
        lines.append(
            f"  {day}  {found['predictions']:>8,} predictions  max PSI {found['max_psi']:.3f}  "
            f"against v{found['reference_version']}'s {found['reference_batch']}  top: {found['top_movers']}"
        )
    return "\n".join(lines)
