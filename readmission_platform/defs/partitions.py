import dagster as dg

# One partition per landed batch file; the landing sensor adds them.
batches = dg.DynamicPartitionsDefinition(name="batches")

# DuckDB admits one writing process: every step that touches the warehouse takes a slot of this
# pool, whose limit dagster.yaml sets to 1. On PostgreSQL the limit can be raised.
WAREHOUSE_POOL = "warehouse"
