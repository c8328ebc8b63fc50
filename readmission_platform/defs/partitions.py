import dagster as dg

# One partition per landed batch file; the landing sensor adds them.
batches = dg.DynamicPartitionsDefinition(name="batches")
# One partition per landed file of outcomes; the outcome sensor adds them.
outcome_files = dg.DynamicPartitionsDefinition(name="outcome_files")

# DuckDB admits one writing process: every step that touches the warehouse takes a slot of this
# pool, whose limit dagster.yaml sets to 1. On PostgreSQL the limit can be raised.
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

# One partition per UTC day of served predictions; today's is open, so a day can be looked at while it runs.
serving_days = dg.DailyPartitionsDefinition(start_date="2026-01-01", end_offset=1)
