"""patient_history: every patient's point-in-time history state, where the service looks it up.

History runs across batches: an encounter's history is read from every earlier encounter of the patient, whichever
batch brought it. So both assets that read history are downstream of every raw_batches partition: this one and
training_set (`defs/training/assets.py`). Re-materializing any batch makes both stale in the UI, and materializing them
recomputes the history of every encounter, later batches' included (`lib/history`). This one also reads every
outcome file: an encounter the service scored for a named patient, once its outcome has come back, counts in that
patient's history (`history.keyed_states`), so the next request for the patient sees it.
"""

import dagster as dg
import polars as pl

from readmission_platform.defs.partitions import WAREHOUSE_POOL, latest_by_partition
from readmission_platform.defs.resources import PredictionLogResource, WarehouseResource
from readmission_platform.lib import schema
from readmission_platform.lib.history import CONFIRMED_SCHEMA, KEY, keyed_states
from readmission_platform.lib.history_store import write_states
from readmission_platform.lib.outcomes import OUTCOMES
from readmission_platform.lib.pipeline import RAW
from readmission_platform.lib.reporting import markdown_table
from readmission_platform.lib.warehouse import Warehouse


def materialized_raw(instance: dg.DagsterInstance, store: Warehouse) -> pl.DataFrame:
    """The raw encounters of every batch Dagster records raw_batches as materialized."""
    batches = sorted(latest_by_partition(instance, RAW))
    return store.read_table(RAW).filter(pl.col(schema.BATCH_ID).is_in(batches))


def confirmed_encounters(instance: dg.DagsterInstance, store: Warehouse, prediction_log: PredictionLogResource) -> pl.DataFrame:
    """The encounters the service scored for a named patient (a `patient_key` in the prediction log) whose outcome is
    stored, of every outcome file Dagster records as materialized: `history.CONFIRMED_SCHEMA`."""
    files = sorted(latest_by_partition(instance, OUTCOMES))
    if not files or OUTCOMES not in store.tables():
        return pl.DataFrame(schema=CONFIRMED_SCHEMA)
    known = store.read_table(OUTCOMES).filter(pl.col(schema.BATCH_ID).is_in(files)).select("request_id", "readmitted_30d")
    logged = prediction_log.read([name for name in CONFIRMED_SCHEMA if name != "readmitted_30d"])
    # A request logged more than once (a client's retry, /explain after /predict) is one encounter: its first row.
    first = logged.filter(pl.col(KEY).is_not_null()).unique("request_id", keep="first", maintain_order=True)
    return first.join(known, on="request_id").select(list(CONFIRMED_SCHEMA)).cast(CONFIRMED_SCHEMA)


@dg.asset(
    deps=[RAW, OUTCOMES],
    group_name="history",
    kinds={"polars", "sql"},
    pool=WAREHOUSE_POOL,
    description="Each patient's history state after their latest encounter (loaded, or scored by the service with an outcome back), keyed by a keyed hash of the patient id, in the prediction log's database for the service.",
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
        confirmed = confirmed_encounters(context.instance, store, prediction_log)
    states = keyed_states(raw, confirmed, prediction_log.patient_key.encode())
    engine = prediction_log.engine()
    try:
        version = write_states(engine, states)
    finally:
        # Its SQLite connections are closed, not left to the collector: the log is read through ADBC's own SQLite,
        # and one process holding a file open through both loses its locks when either closes it.
        engine.dispose()
    spread = states.group_by(pl.col("encounters").clip(upper_bound=5).alias("encounters (5: 5 or more)")).len("patients")
    return dg.MaterializeResult(
        metadata={
            "dagster/row_count": states.height,
            "encounters": raw.height,
            "confirmed_encounters": confirmed.height,
            "batches": ", ".join(sorted(raw[schema.BATCH_ID].unique())),
            "store_version": version,
            "patients_by_encounters": dg.MetadataValue.md(markdown_table(spread.sort(spread.columns[0]))),
        }
    )
