"""clean_batches and features: a batch's typed encounters and its model-ready columns.

Both are computed in the same pass as raw_batches, by the `batch_tables` op of `defs/ingestion/assets.py`, so no
stage reads back what the one before it just wrote; this module declares them and what their materializations show.
"""

import dagster as dg

from readmission_platform.lib import schema
from readmission_platform.lib.features import FEATURE_COLUMNS
from readmission_platform.lib.pipeline import CLEAN, FEATURES, RAW, BatchRun
from readmission_platform.lib.reporting import markdown_table

KINDS = {"polars", "sql"}

# A tuple, not names of their own: the defs loader would take a module-level AssetSpec for an asset of its own.
SPECS = (
    dg.AssetSpec(
        CLEAN,
        deps=[RAW],
        group_name="preparation",
        kinds=KINDS,
        skippable=True,
        description="Typed encounters with ICD-9 groups and the 30-day label; deaths, hospice and invalid gender dropped.",
    ),
    dg.AssetSpec(
        FEATURES,
        deps=[CLEAN],
        group_name="preparation",
        kinds=KINDS,
        skippable=True,
        description="Model-ready feature columns of lib/features.py, with identifiers and labels kept for lineage and splitting.",
    ),
)


def clean_metadata(run: BatchRun) -> dict:
    frame = run.cleaned.frame
    rate = frame[schema.LABEL_30D].mean() if frame.height else None
    return {
        "dagster/row_count": frame.height,
        **{f"dropped_{reason}": count for reason, count in run.cleaned.dropped.items()},
        "readmitted_30d_rate": float(rate) if rate is not None else None,
        "preview": dg.MetadataValue.md(markdown_table(frame.head(5))),
    }


def features_metadata(run: BatchRun) -> dict:
    return {
        "dagster/row_count": run.features.height,
        "feature_columns": len(FEATURE_COLUMNS),
        "preview": dg.MetadataValue.md(markdown_table(run.features.select(FEATURE_COLUMNS[:12]).head(5))),
    }
