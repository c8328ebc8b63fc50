import dagster as dg

from readmission_platform.defs.partitions import WAREHOUSE_POOL, batches
from readmission_platform.defs.preparation.assets import clean_batches, features
from readmission_platform.defs.resources import WarehouseResource
from readmission_platform.lib import schema
from readmission_platform.lib.features import FEATURE_COLUMNS, FEATURE_SCHEMA
from readmission_platform.lib.validation import clean_violations


class LabelRateConfig(dg.Config):
    # The data set's <30 rate is 11.2 %; a batch far outside this band points at a broken export.
    min_rate: float = 0.05
    max_rate: float = 0.20


@dg.asset_check(
    asset=clean_batches,
    partitions_def=batches,
    blocking=True,
    pool=WAREHOUSE_POOL,
    description="Every clean column holds only its declared type, enumeration or range, and no null where one is not allowed.",
)
def check_clean_batches_values(
    context: dg.AssetCheckExecutionContext, warehouse: WarehouseResource
) -> dg.AssetCheckResult:
    frame = warehouse.open().read_table("clean_batches", context.partition_key)
    violations = clean_violations(frame)
    return dg.AssetCheckResult(
        passed=not violations,
        description="\n".join(v.message for v in violations)
        or f"{frame.height} rows, {len(schema.CLEAN_COLUMNS)} columns within their declared values",
        metadata={"rows_checked": frame.height, **{f"violations_{v.column}": v.rows for v in violations}},
    )


@dg.asset_check(
    asset=clean_batches,
    partitions_def=batches,
    blocking=True,
    pool=WAREHOUSE_POOL,
    description="Every encounter has its label (error otherwise); the <30 rate lies in a plausible band (warns).",
)
def check_clean_batches_label(
    context: dg.AssetCheckExecutionContext, config: LabelRateConfig, warehouse: WarehouseResource
) -> dg.AssetCheckResult:
    labels = warehouse.open().query(
        f"SELECT {schema.LABEL_30D} AS label FROM clean_batches WHERE batch_id = $1", [context.partition_key]
    )
    missing = labels["label"].null_count() if labels.height else 0
    rate = labels["label"].mean() if labels.height > missing else None
    metadata = {"rows": labels.height, "missing_labels": missing, "readmitted_30d_rate": rate}
    if not labels.height or missing:
        return dg.AssetCheckResult(
            passed=False,
            description=f"{missing} of {labels.height} encounters have no readmitted label; expected NO, >30 or <30",
            metadata=metadata,
        )
    in_band = config.min_rate <= rate <= config.max_rate
    return dg.AssetCheckResult(
        passed=in_band,
        severity=dg.AssetCheckSeverity.WARN,
        description=f"<30 rate {rate:.2%} "
        + (f"within {config.min_rate:.0%}–{config.max_rate:.0%}" if in_band else f"outside {config.min_rate:.0%}–{config.max_rate:.0%}"),
        metadata=metadata,
    )


@dg.asset_check(
    asset=features,
    partitions_def=batches,
    blocking=True,
    pool=WAREHOUSE_POOL,
    description="The features table has exactly the declared feature spec, and no identifier is a feature column.",
)
def check_features_spec(context: dg.AssetCheckExecutionContext, warehouse: WarehouseResource) -> dg.AssetCheckResult:
    with warehouse.open() as store:
        problems, count = store.shape_problems("features", FEATURE_SCHEMA, context.partition_key)
    leaked = [c for c in FEATURE_COLUMNS if c in schema.IDENTIFIERS or c in (schema.LABEL, schema.LABEL_30D)]
    if leaked:
        problems.append(f"identifier or label columns declared as features: {leaked}")
    return dg.AssetCheckResult(
        passed=not problems,
        description="; ".join(problems) or f"{len(FEATURE_COLUMNS)} feature columns as declared, {count} rows",
        metadata={"rows": count, "feature_columns": len(FEATURE_COLUMNS)},
    )
