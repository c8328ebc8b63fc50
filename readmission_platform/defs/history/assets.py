"""patient_history: every patient's point-in-time history state, where the service looks it up.

History runs across batches: an encounter's history is read from every earlier encounter of the patient, whichever
batch brought it. So both assets that read history are downstream of every raw_batches partition: this one and
training_set (`defs/training/assets.py`). Re-materializing any batch makes both stale in the UI, and materializing them
recomputes the history of every encounter, later batches' included (`lib/history`).
"""

import dagster as dg
import polars as pl

from readmission_platform.defs.partitions import WAREHOUSE_POOL, latest_by_partition
from readmission_platform.defs.resources import PredictionLogResource, WarehouseResource
from readmission_platform.lib import schema
from readmission_platform.lib.history import PATIENT, patient_keys, patient_states
from readmission_platform.lib.history_store import KEY, write_states
from readmission_platform.lib.pipeline import RAW
from readmission_platform.lib.reporting import markdown_table
from readmission_platform.lib.warehouse import Warehouse


def materialized_raw(instance: dg.DagsterInstance, store: Warehouse) -> pl.DataFrame:
    """The raw encounters of every batch Dagster records raw_batches as materialized."""
    batches = sorted(latest_by_partition(instance, RAW))
    return store.read_table(RAW).filter(pl.col(schema.BATCH_ID).is_in(batches))


@dg.asset(
    deps=[RAW],
    group_name="history",
    kinds={"polars", "sql"},
    pool=WAREHOUSE_POOL,
    description="Each patient's history state after their latest loaded encounter, keyed by a keyed hash of the patient id, in the prediction log's database for the service.",
)
def patient_history(
    context: dg.AssetExecutionContext, warehouse: WarehouseResource, prediction_log: PredictionLogResource
) -> dg.MaterializeResult:
    if not prediction_log.patient_key:
        raise dg.Failure(
            "READMISSION_PATIENT_KEY is not set: patient identifiers cannot be hashed, so no history is stored for the "
            "service; set it (the same value in the pipeline and the service) and materialize patient_history again"
        )
    with warehouse.open() as store:
        raw = materialized_raw(context.instance, store)
    states = patient_states(raw)
    keyed = states.with_columns(
        pl.Series(KEY, patient_keys(states[PATIENT], prediction_log.patient_key.encode()), pl.String)
    ).drop(PATIENT)
    version = write_states(prediction_log.engine(), keyed)
    spread = states.group_by(pl.col("encounters").clip(upper_bound=5).alias("loaded encounters (5: 5 or more)")).len("patients")
    return dg.MaterializeResult(
        metadata={
            "dagster/row_count": keyed.height,
            "encounters": raw.height,
            "batches": ", ".join(sorted(raw[schema.BATCH_ID].unique())),
            "store_version": version,
            "patients_by_encounters": dg.MetadataValue.md(markdown_table(spread.sort(spread.columns[0]))),
        }
    )
