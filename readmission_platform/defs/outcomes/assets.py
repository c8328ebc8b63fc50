"""outcomes: each landed file of outcomes checked against the prediction log and stored, one partition a file."""

from datetime import UTC, datetime

import dagster as dg
import polars as pl

from readmission_platform.defs.partitions import WAREHOUSE_POOL, outcome_files
from readmission_platform.defs.resources import LandingResource, PredictionLogResource, WarehouseResource
from readmission_platform.lib.landing import AmbiguousBatchFile, content_hash, find_batch_file
from readmission_platform.lib.outcomes import (
    OUTCOME_SCHEMA,
    OUTCOMES,
    SET_ASIDE,
    SET_ASIDE_SCHEMA,
    OutcomeFileError,
    judge_outcomes,
    read_outcomes,
)
from readmission_platform.lib.reporting import markdown_table
from readmission_platform.lib.warehouse import retried_on_conflict


@dg.asset(
    partitions_def=outcome_files,
    group_name="outcomes",
    kinds={"polars", "sql"},
    pool=WAREHOUSE_POOL,
    description="Each landed file of outcomes (readmitted within 30 days or not) of predicted requests; unknown requests and second outcomes set aside in outcomes_set_aside.",
)
def outcomes(
    context: dg.AssetExecutionContext,
    landing: LandingResource,
    warehouse: WarehouseResource,
    prediction_log: PredictionLogResource,
) -> dg.MaterializeResult:
    batch_id = context.partition_key
    try:
        path = find_batch_file(landing.outcomes_path, batch_id)
    except AmbiguousBatchFile as error:
        raise dg.Failure(description=f"outcomes {batch_id} were not loaded, nothing was written: {error}") from None
    if path is None:
        raise dg.Failure(f"no file for outcomes {batch_id!r} in {landing.outcomes_path}; it was removed after it landed")
    content = path.read_bytes()
    try:
        read = read_outcomes(content, path.name)
    except OutcomeFileError as error:
        raise dg.Failure(description=f"outcomes {batch_id} were not loaded, nothing was written: {error}") from None
    predicted = prediction_log.read(["request_id"])["request_id"].unique()
    now = datetime.now(UTC)
    with warehouse.open() as store:

        def write():
            with store.batch_writer(batch_id) as writer:
                # Writers of other files on PostgreSQL run side by side: one that stores an outcome of the same request
                # meanwhile makes this write fail, and it is judged again (`retried_on_conflict`).
                stored = writer.stored_elsewhere(OUTCOMES, "request_id", text=True)
                judged = judge_outcomes(read, batch_id=batch_id, source_file=path.name, now=now, predicted=predicted, stored=stored)
                writer.put(OUTCOMES, OUTCOME_SCHEMA, judged.outcomes)
                writer.put(SET_ASIDE, SET_ASIDE_SCHEMA, judged.set_aside)
            return judged

        judged = retried_on_conflict(write)
    reasons = judged.set_aside.group_by(pl.col("reason").str.extract(r"^([^:]+)")).len("outcomes").sort("reason")
    context.log.info(f"{batch_id}: {judged.outcomes.height} outcomes stored, {judged.set_aside.height} set aside")
    return dg.MaterializeResult(
        metadata={
            "dagster/row_count": judged.outcomes.height,
            "readmitted": int(judged.outcomes["readmitted_30d"].sum()),
            "set_aside": judged.set_aside.height,
            "set_aside_reasons": dg.MetadataValue.md(markdown_table(reasons) if reasons.height else "none"),
            "source_file": path.name,
            "sha256": content_hash(content),
            "warehouse": store.describe(),
        }
    )
