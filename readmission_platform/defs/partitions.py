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
