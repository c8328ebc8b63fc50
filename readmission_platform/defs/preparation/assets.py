import dagster as dg

from readmission_platform.defs.ingestion.assets import raw_batches
from readmission_platform.defs.partitions import WAREHOUSE_POOL, batches
from readmission_platform.defs.resources import WarehouseResource
from readmission_platform.lib import schema
from readmission_platform.lib.features import FEATURE_COLUMNS
from readmission_platform.lib.pipeline import clean_batch, feature_batch
from readmission_platform.lib.reporting import markdown_table


@dg.asset(
    deps=[raw_batches],
    partitions_def=batches,
    group_name="preparation",
    kinds={"polars", "sql"},
    pool=WAREHOUSE_POOL,
    description="Typed encounters with ICD-9 groups and the 30-day label; deaths, hospice and invalid gender dropped.",
)
def clean_batches(context: dg.AssetExecutionContext, warehouse: WarehouseResource) -> dg.MaterializeResult:
    with warehouse.open() as store:
        result = clean_batch(store, context.partition_key)
    rate = result.frame[schema.LABEL_30D].mean() if result.frame.height else None
    return dg.MaterializeResult(
        metadata={
            "dagster/row_count": result.frame.height,
            **{f"dropped_{reason}": count for reason, count in result.dropped.items()},
            "readmitted_30d_rate": float(rate) if rate is not None else None,
            "preview": dg.MetadataValue.md(markdown_table(result.frame.head(5))),
        }
    )


@dg.asset(
    deps=[clean_batches],
    partitions_def=batches,
    group_name="preparation",
    kinds={"polars", "sql"},
    pool=WAREHOUSE_POOL,
    description="Model-ready feature columns of lib/features.py, with identifiers and labels kept for lineage and splitting.",
)
def features(context: dg.AssetExecutionContext, warehouse: WarehouseResource) -> dg.MaterializeResult:
    with warehouse.open() as store:
        table = feature_batch(store, context.partition_key)
    return dg.MaterializeResult(
        metadata={
            "dagster/row_count": table.height,
            "feature_columns": len(FEATURE_COLUMNS),
            "preview": dg.MetadataValue.md(markdown_table(table.select(FEATURE_COLUMNS[:12]).head(5))),
        }
    )
