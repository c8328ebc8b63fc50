import dagster as dg

from readmission_platform.defs.monitoring.assets import batch_drift
from readmission_platform.defs.partitions import WAREHOUSE_POOL, batches
from readmission_platform.defs.resources import WarehouseResource
from readmission_platform.lib.drift import PSI_SIGNIFICANT
from readmission_platform.lib.reporting import examples


class DriftConfig(dg.Config):
    max_psi: float = PSI_SIGNIFICANT
    """A feature whose population stability index reaches this has drifted."""


@dg.asset_check(
    asset=batch_drift,
    partitions_def=batches,
    pool=WAREHOUSE_POOL,
    description="No feature of the batch drifted from the newest batch the production model was trained on (warns).",
)
def check_batch_drift_psi(
    context: dg.AssetCheckExecutionContext, config: DriftConfig, warehouse: WarehouseResource
) -> dg.AssetCheckResult:
    drift = warehouse.open().query(
        "SELECT feature, psi, reference_version FROM batch_drift WHERE batch_id = $1 ORDER BY psi DESC",
        [context.partition_key],
    )
    if not drift.height:
        return dg.AssetCheckResult(passed=True, description="no model in production yet: drift not measured")
    drifted = drift.filter(drift["psi"] >= config.max_psi)
    version = drift["reference_version"][0]
    return dg.AssetCheckResult(
        passed=not drifted.height,
        severity=dg.AssetCheckSeverity.WARN,
        description=f"{drifted.height} features drifted from v{version}'s training data (PSI ≥ {config.max_psi}): "
        + examples(f"{f} {p:.2f}" for f, p in drifted.select("feature", "psi").iter_rows())
        if drifted.height
        else f"largest PSI {drift['psi'][0]:.3f} ({drift['feature'][0]}) against v{version}, under {config.max_psi}",
        metadata={"drifted_features": drifted.height, "max_psi": float(drift["psi"][0])},
    )
