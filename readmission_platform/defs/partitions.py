import dagster as dg

# One partition per landed batch file; the landing sensor adds them.
batches = dg.DynamicPartitionsDefinition(name="batches")
# One partition per landed file of outcomes; the outcome sensor adds them.
outcome_files = dg.DynamicPartitionsDefinition(name="outcome_files")

# DuckDB admits one writing process: every step that reads or writes the warehouse for its length takes a slot of
# this pool, whose limit dagster.yaml sets to 1 (README, Dagster instance). On PostgreSQL the limit can be raised.
WAREHOUSE_POOL = "warehouse"


def latest_by_partition(instance: dg.DagsterInstance, asset: str) -> dict[str, dg.EventLogRecord]:
    """The newest materialization record of each partition of an asset."""
    newest: dict[str, dg.EventLogRecord] = {}
    result = instance.fetch_materializations(dg.AssetKey(asset), limit=10_000, ascending=False)
    for record in result.records:
        key = record.asset_materialization.partition
        if key and key not in newest:
            newest[key] = record
    return newest


def run_group(instance: dg.DagsterInstance, run_id: str) -> list[str]:
    """The ids of a run and of the other attempts of it (a retry re-executes a run from its failed step); none when the
    run is not on this instance."""
    if not instance.has_run(run_id):
        return []
    group = instance.get_run_group(run_id)
    return [run.run_id for run in group[1]] if group else [run_id]


def materialized_in_run_group(instance: dg.DagsterInstance, run_id: str, asset: dg.AssetKey) -> list[dg.EventLogRecord]:
    """The records of `asset`'s materializations in a run and the other attempts of it (`run_group`)."""
    return [
        record
        for attempt in run_group(instance, run_id)
        for record in instance.get_records_for_run(attempt, of_type=dg.DagsterEventType.ASSET_MATERIALIZATION).records
        if record.asset_materialization is not None and record.asset_materialization.asset_key == asset
    ]


# How many of a check's newest executions `latest_evaluation` looks through (past runs that failed before evaluating).
EXECUTIONS_SEARCHED = 20


def latest_evaluation(instance: dg.DagsterInstance, key: dg.AssetCheckKey):
    """The newest evaluation record of a check, or None. A run that failed before its checks ran leaves only their
    plans, newer than the last evaluation; those are passed over."""
    for record in instance.event_log_storage.get_asset_check_execution_history(key, limit=EXECUTIONS_SEARCHED):
        if record.event is not None and record.event.asset_check_evaluation is not None:
            return record
    return None


# One partition per UTC day of served predictions; today's is open, so a day can be looked at while it runs.
serving_days = dg.DailyPartitionsDefinition(start_date="2026-01-01", end_offset=1)
