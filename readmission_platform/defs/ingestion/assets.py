from datetime import UTC, datetime

import dagster as dg
import polars as pl

from readmission_platform.defs.partitions import WAREHOUSE_POOL, batches
from readmission_platform.defs.resources import LandingResource, WarehouseResource
from readmission_platform.lib.ingest import BatchFileError
from readmission_platform.lib.landing import content_hash, find_batch_file
from readmission_platform.lib.pipeline import ingest_batch
from readmission_platform.lib.reporting import markdown_table


@dg.asset(
    partitions_def=batches,
    group_name="ingestion",
    kinds={"polars", "sql"},
    pool=WAREHOUSE_POOL,
    description="Each landed batch file as delivered (text columns), with rows that cannot be accepted set aside in rejected_rows.",
)
def raw_batches(
    context: dg.AssetExecutionContext, landing: LandingResource, warehouse: WarehouseResource
) -> dg.MaterializeResult:
    batch_id = context.partition_key
    path = find_batch_file(landing.path, batch_id)
    if path is None:
        raise dg.Failure(f"no file for batch {batch_id!r} in {landing.path}; it was removed after it landed")
    content = path.read_bytes()
    try:
        with warehouse.open() as store:
            parsed = ingest_batch(store, content, batch_id=batch_id, source_file=path.name, now=datetime.now(UTC))
    except BatchFileError as error:
        raise dg.Failure(description=f"batch {batch_id} was not loaded, nothing was written: {error}") from None
    reasons = (
        parsed.rejected.select(pl.col("reason").str.replace_all(r"\d+", "N").alias("reason"))
        .group_by("reason")
        .len("rows")
        .sort("rows", descending=True)
    )
    context.log.info(f"{batch_id}: {parsed.rows.height} rows loaded, {parsed.rejected.height} rejected")
    return dg.MaterializeResult(
        metadata={
            "dagster/row_count": parsed.rows.height,
            "rejected_rows": parsed.rejected.height,
            "source_file": path.name,
            "sha256": content_hash(content),
            "warehouse": store.describe(),
            "rejection_reasons": dg.MetadataValue.md(markdown_table(reasons) if reasons.height else "none"),
        }
    )
