import dagster as dg

from readmission_platform.defs.outcomes.assets import outcomes
from readmission_platform.defs.partitions import WAREHOUSE_POOL, outcome_files
from readmission_platform.defs.resources import WarehouseResource
from readmission_platform.lib.outcomes import SET_ASIDE
from readmission_platform.lib.reporting import examples


@dg.asset_check(
    asset=outcomes,
    partitions_def=outcome_files,
    pool=WAREHOUSE_POOL,
    description="Every outcome of the file matched a logged prediction that had none yet (warns).",
)
def check_outcomes_set_aside(context: dg.AssetCheckExecutionContext, warehouse: WarehouseResource) -> dg.AssetCheckResult:
    aside = warehouse.open().query(
        f"SELECT request_id, reason FROM {SET_ASIDE} WHERE batch_id = $1 ORDER BY line_number", [context.partition_key]
    )
    if not aside.height:
        return dg.AssetCheckResult(passed=True, description="every outcome matched a prediction without an outcome")
    counts = aside.group_by(aside["reason"].str.extract(r"^([^:]+)")).len().sort("reason")
    return dg.AssetCheckResult(
        passed=False,
        severity=dg.AssetCheckSeverity.WARN,
        description=f"{aside.height} outcomes set aside ("
        + ", ".join(f"{n} {reason}" for reason, n in counts.iter_rows())
        + f"), e.g. request_id {examples(aside['request_id'].to_list())}; see table {SET_ASIDE}",
        metadata={"set_aside": aside.height},
    )
