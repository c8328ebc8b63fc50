"""The data tests of clean_batches and features: evaluated by `batch_tables` on the rows it is about to store, or
alone (a check selected without its asset) on the rows the warehouse holds."""

import dagster as dg

from readmission_platform.lib import schema
from readmission_platform.lib.cleaning import CleanResult
from readmission_platform.lib.features import FEATURE_COLUMNS, FEATURE_SCHEMA
from readmission_platform.lib.pipeline import CLEAN, FEATURES, BatchRun
from readmission_platform.lib.validation import clean_violations, shape_problems
from readmission_platform.lib.warehouse import Warehouse

VALUES = dg.AssetCheckSpec(
    "check_clean_batches_values",
    asset=CLEAN,
    blocking=True,
    description="Every clean column holds only its declared type, enumeration or range, and no null where one is not allowed.",
)
LABEL = dg.AssetCheckSpec(
    "check_clean_batches_label",
    asset=CLEAN,
    blocking=True,
    description="Every encounter has its label (error otherwise); the <30 rate lies in a plausible band (warns).",
)
SPEC = dg.AssetCheckSpec(
    "check_features_spec",
    asset=FEATURES,
    blocking=True,
    description="The features table has exactly the declared feature spec, and no identifier is a feature column.",
)


def check_clean_batches_values(run: BatchRun, config) -> dg.AssetCheckResult:
    frame = run.cleaned.frame
    violations = clean_violations(frame)
    return dg.AssetCheckResult(
        asset_key=VALUES.asset_key,
        check_name=VALUES.name,
        passed=not violations,
        description="\n".join(v.message for v in violations)
        or f"{frame.height} rows, {len(schema.CLEAN_COLUMNS)} columns within their declared values",
        metadata={"rows_checked": frame.height, **{f"violations_{v.column}": v.rows for v in violations}},
    )


def check_clean_batches_label(run: BatchRun, config) -> dg.AssetCheckResult:
    min_rate, max_rate = config.min_label_rate, config.max_label_rate
    labels = run.cleaned.frame[schema.LABEL_30D]
    missing = labels.null_count()
    rate = labels.mean() if labels.len() > missing else None
    metadata = {"rows": labels.len(), "missing_labels": missing, "readmitted_30d_rate": rate}
    if not labels.len() or missing:
        return dg.AssetCheckResult(
            asset_key=LABEL.asset_key,
            check_name=LABEL.name,
            passed=False,
            description=f"{missing} of {labels.len()} encounters have no readmitted label; expected NO, >30 or <30",
            metadata=metadata,
        )
    in_band = min_rate <= rate <= max_rate
    band = f"{min_rate:.0%}–{max_rate:.0%}"
    return dg.AssetCheckResult(
        asset_key=LABEL.asset_key,
        check_name=LABEL.name,
        passed=in_band,
        severity=dg.AssetCheckSeverity.WARN,
        description=f"<30 rate {rate:.2%} " + (f"within {band}" if in_band else f"outside {band}"),
        metadata=metadata,
    )


def check_features_spec(run: BatchRun, config) -> dg.AssetCheckResult:
    frame = run.features
    problems = shape_problems(FEATURES, FEATURE_SCHEMA, frame, run.batch_id)
    leaked = [c for c in FEATURE_COLUMNS if c in schema.IDENTIFIERS or c in (schema.LABEL, schema.LABEL_30D)]
    if leaked:
        problems.append(f"identifier or label columns declared as features: {leaked}")
    return dg.AssetCheckResult(
        asset_key=SPEC.asset_key,
        check_name=SPEC.name,
        passed=not problems,
        description="; ".join(problems) or f"{len(FEATURE_COLUMNS)} feature columns as declared, {frame.height} rows",
        metadata={"rows": frame.height, "feature_columns": len(FEATURE_COLUMNS)},
    )


CLEAN_CHECKS = ((VALUES, check_clean_batches_values), (LABEL, check_clean_batches_label))
FEATURE_CHECKS = ((SPEC, check_features_spec),)


def stored_clean(store: Warehouse, batch_id: str) -> BatchRun:
    """The batch's clean rows as the warehouse holds them (what was dropped is not stored)."""
    return BatchRun(batch_id, cleaned=CleanResult(store.read_table(CLEAN, batch_id), {}))


def stored_features(store: Warehouse, batch_id: str) -> BatchRun:
    """The batch's feature rows as the warehouse holds them."""
    return BatchRun(batch_id, features=store.read_table(FEATURES, batch_id))
