import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

import dagster as dg
import polars as pl

from readmission_platform.defs.partitions import WAREHOUSE_POOL, latest_by_partition
from readmission_platform.defs.resources import MlflowResource, WarehouseResource
from readmission_platform.lib import schema
from readmission_platform.lib.evaluation import subgroup_tables
from readmission_platform.defs.history.assets import materialized_raw
from readmission_platform.lib.features import FEATURE_SCHEMA, HISTORY_SCHEMA
from readmission_platform.lib.history import with_history
from readmission_platform.lib.pipeline import FEATURES, RAW
from readmission_platform.lib.plots import evaluation_plots
from readmission_platform.lib.reporting import markdown_table
from readmission_platform.lib.splitting import SPLIT, assign_split, split_overlap
from readmission_platform.lib.training import (
    FAMILIES,
    choose_challenger,
    feature_importances,
    labels,
    model_input,
    predict_probability,
    train_candidates,
)

if TYPE_CHECKING:
    from mlflow.entities.model_registry import ModelVersion

    from readmission_platform.lib.registry import ModelRegistry

TRAINING_SET_SCHEMA = FEATURE_SCHEMA | HISTORY_SCHEMA | {SPLIT: pl.String()}


@dg.asset(
    # History reads the patient's earlier encounters in every batch: each raw_batches partition is an input.
    deps=[FEATURES, RAW],
    group_name="training",
    kinds={"polars", "sql"},
    pool=WAREHOUSE_POOL,
    description="The features of every batch Dagster records as materialized, with each encounter's point-in-time history (lib/history.py) and a patient-grouped train/validation/test side (70/15/15) fixed by a hash of the patient id.",
)
def training_set(context: dg.AssetExecutionContext, warehouse: WarehouseResource) -> dg.MaterializeResult:
    # A run killed after the warehouse committed a batch but before Dagster recorded it leaves rows that Dagster calls
    # failed; they are left out until the run's retry materializes the batch, so training matches what Dagster shows.
    materialized = sorted(latest_by_partition(context.instance, FEATURES))
    with warehouse.open() as store:
        stored = store.read_table(FEATURES)
        features = stored.filter(pl.col(schema.BATCH_ID).is_in(materialized))
        raw = materialized_raw(context.instance, store)
        table = assign_split(with_history(features, raw)).select(list(TRAINING_SET_SCHEMA))
        store.replace_table("training_set", TRAINING_SET_SCHEMA, table)
    unrecorded = sorted(set(stored[schema.BATCH_ID].unique()) - set(materialized))
    if unrecorded:
        context.log.warning(f"left out {', '.join(unrecorded)}: stored in the warehouse, but Dagster has no materialization of them")
    sides = table.group_by(SPLIT).agg(
        pl.len().alias("rows"),
        pl.col("patient_nbr").n_unique().alias("patients"),
        pl.col(schema.LABEL_30D).mean().alias("readmitted_30d_rate"),
    )
    return dg.MaterializeResult(
        metadata={
            "dagster/row_count": table.height,
            "batches": ", ".join(sorted(table[schema.BATCH_ID].unique())),
            "batches_left_out": ", ".join(unrecorded) or "none",
            "patients": split_overlap(table)["patients"],
            "sides": dg.MetadataValue.md(markdown_table(sides.sort(SPLIT))),
        }
    )


class TrainingConfig(dg.Config):
    families: list[str] = list(FAMILIES)
    """Model families to train; the best on validation ROC-AUC (PR-AUC on ties) becomes the challenger."""
    seed: int = 0


def _lineage(context: dg.AssetExecutionContext, parts: dict[str, pl.DataFrame], batches_tag: str, group_tag: str) -> dict[str, str]:
    batches = sorted(pl.concat([p[schema.BATCH_ID] for p in parts.values()]).unique())
    return {
        batches_tag: ",".join(batches),
        "trained_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "dagster_run_id": context.run.run_id,
        group_tag: context.run.root_run_id or context.run.run_id,
        "dagster_partition_keys": ",".join(batches),
        **{f"{name}_rows": str(part.height) for name, part in parts.items()},
    }


@dg.asset(
    deps=[training_set],
    group_name="training",
    kinds={"scikitlearn", "mlflow"},
    description="Candidates of each model family tracked in MLflow; the best on validation is registered as the challenger.",
)
def trained_model(
    context: dg.AssetExecutionContext, config: TrainingConfig, warehouse: WarehouseResource, mlflow: MlflowResource
) -> dg.MaterializeResult:
    from readmission_platform.lib.registry import BATCHES_TAG, RUN_GROUP_TAG

    registry = mlflow.registry()
    # An attempt of this run killed in this step left its MLflow runs RUNNING, and maybe a challenger it registered
    # before Dagster recorded it: the runs are ended, and that version stands instead of a second one.
    group = context.run.root_run_id or context.run.run_id
    if killed := registry.end_killed_runs({RUN_GROUP_TAG: group}):
        context.log.warning(f"marked MLflow runs {', '.join(killed)} KILLED: an attempt of this run died while logging them")
    if (registered := registry.registered_by(group)) is not None:
        context.log.info(f"version {registered.version} was registered by run {registered.tags['dagster_run_id']} of this run group; not registering another")
        return _registered_before(registry, registered)
    parts = warehouse.training_parts()
    train, validation = parts["train"], parts["validation"]
    candidates = train_candidates(train, validation, families=tuple(config.families), seed=config.seed)
    lineage = _lineage(context, parts, BATCHES_TAG, RUN_GROUP_TAG)
    challenger = choose_challenger(candidates)
    run_ids = {}
    for candidate in candidates:
        chosen = candidate is challenger
        with tempfile.TemporaryDirectory() as folder:
            # Only the challenger can be registered and served: its model, plots, permutation importances and
            # subgroups are what a person looks at, and the others' cost as much again (benchmarks/README.md,
            # Training); their runs keep the figures they were judged on.
            artifacts = {}
            if chosen:
                subgroups = subgroup_tables(candidate.model, validation, threshold=candidate.threshold)
                artifacts = evaluation_plots(labels(validation), predict_probability(candidate.model, validation), Path(folder), candidate.family)
                artifacts["feature_importances"] = Path(folder) / "feature_importances.csv"
                feature_importances(candidate.model, validation).write_csv(artifacts["feature_importances"])
                artifacts["subgroups"] = Path(folder) / "subgroups_validation.csv"
                subgroups.write_csv(artifacts["subgroups"])
            run_ids[candidate.family] = registry.log_candidate(
                candidate.model if chosen else None,
                params={"family": candidate.family, "threshold": candidate.threshold, **candidate.params},
                metrics={**{f"validation_{k}": v for k, v in candidate.validation.items()}, "fit_seconds": candidate.fit_seconds},
                tags=lineage | {"grid": str(list(candidate.grid))},
                artifacts=artifacts,
                input_example=model_input(train.head(5)) if chosen else None,
                run_name=candidate.family,
            )
    version = registry.register(
        run_ids[challenger.family], threshold=challenger.threshold, tags=lineage | {"family": challenger.family}
    )
    table = pl.DataFrame(
        [
            {"family": c.family, **{k: round(c.validation[k], 4) for k in ("roc_auc", "pr_auc", "brier", "f1")}, "fit_s": round(c.fit_seconds, 1)}
            for c in candidates
        ]
    ).sort("roc_auc", descending=True)
    return dg.MaterializeResult(
        metadata={
            "model_version": version,
            "family": challenger.family,
            "threshold": challenger.threshold,
            "threshold_rule": "maximises F1 on the validation part",
            "validation_roc_auc": challenger.validation["roc_auc"],
            "validation_pr_auc": challenger.validation["pr_auc"],
            "validation_brier": challenger.validation["brier"],
            "candidates": dg.MetadataValue.md(markdown_table(table)),
            "subgroups_validation": dg.MetadataValue.md(
                markdown_table(subgroups.select("by", "group", "rows", "roc_auc", "brier", "positive_rate"), limit=30)
            ),
            "mlflow_run": dg.MetadataValue.url(registry.run_url(run_ids[challenger.family])),
            "mlflow_model": dg.MetadataValue.url(registry.version_url(version)),
            "batch_ids": lineage[BATCHES_TAG],
            "train_rows": train.height,
        }
    )


def _registered_before(registry: "ModelRegistry", version: "ModelVersion") -> dg.MaterializeResult:
    """trained_model's metadata for a challenger an earlier attempt of the run registered, from the registry."""
    from readmission_platform.lib.registry import BATCHES_TAG, decision_threshold

    metrics = registry.client.get_run(version.run_id).data.metrics
    return dg.MaterializeResult(
        metadata={
            "model_version": str(version.version),
            "family": version.tags["family"],
            "threshold": decision_threshold(version),
            "threshold_rule": "maximises F1 on the validation part",
            **{f"validation_{k}": metrics[f"validation_{k}"] for k in ("roc_auc", "pr_auc", "brier")},
            "registered_by_run": dg.MetadataValue.dagster_run(version.tags["dagster_run_id"]),
            "mlflow_run": dg.MetadataValue.url(registry.run_url(version.run_id)),
            "mlflow_model": dg.MetadataValue.url(registry.version_url(str(version.version))),
            "batch_ids": version.tags[BATCHES_TAG],
            "train_rows": int(version.tags["train_rows"]),
        }
    )
