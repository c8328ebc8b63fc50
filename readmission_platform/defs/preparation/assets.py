import dagster as dg
import polars as pl

from readmission_platform.defs.ingestion.assets import raw_batches
from readmission_platform.defs.partitions import WAREHOUSE_POOL, batches
from readmission_platform.defs.resources import WarehouseResource
from readmission_platform.lib import schema
from readmission_platform.lib.cleaning import clean
from readmission_platform.lib.features import FEATURE_COLUMNS, FEATURE_SCHEMA, build_features
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
    store = warehouse.open()
    batch_id = context.partition_key
    result = clean(store.read_table("raw_batches", batch_id))
    store.replace_batch({"clean_batches": (schema.CLEAN_SCHEMA, result.frame)}, batch_id)
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
    store = warehouse.open()
    batch_id = context.partition_key
    table = build_features(store.read_table("clean_batches", batch_id))
    store.replace_batch({"features": (FEATURE_SCHEMA, table)}, batch_id)
    return dg.MaterializeResult(
        metadata={
            "dagster/row_count": table.height,
            "feature_columns": len(FEATURE_COLUMNS),
            "preview": dg.MetadataValue.md(markdown_table(table.select(FEATURE_COLUMNS[:12]).head(5))),
        }
    )
