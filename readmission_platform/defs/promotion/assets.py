from datetime import UTC, datetime

import dagster as dg
import polars as pl

from readmission_platform.defs.partitions import materialized_in_run_group, run_group
from readmission_platform.defs.resources import MlflowResource, WarehouseResource
from readmission_platform.lib import metrics, paired
from readmission_platform.lib.evaluation import subgroup_tables
from readmission_platform.lib.model_card import build_card, log_card, to_markdown
from readmission_platform.lib.promotion import (
    DECISION_SCHEMA,
    ROLLOUT_ABORTED,
    Gates,
    decide,
    evidence_figures,
    gate_failures,
    gate_warnings,
    record_decisions,
    rollout_row,
)
from readmission_platform.lib.reporting import markdown_table
from readmission_platform.lib.splitting import PATIENT
from readmission_platform.lib.training import labels, predict_probability

TRAINED_MODEL = dg.AssetKey("trained_model")
REPORTED = ("roc_auc", "pr_auc", "brier", "base_rate_brier", "log_loss", "precision", "recall", "f1", "positive_rate")


class PromotionConfig(dg.Config):
    margin: float = 0.0
    """The lower end of the interval of the challenger's test ROC-AUC gain over production must exceed this."""
    confidence: float = 0.95
    """The level of the paired comparison's intervals: the challenger must be better with this confidence."""
    non_inferiority_margin: float = 0.01
    """Or: a ROC-AUC loss whose interval stays within this, with a Brier score lower with `confidence`."""
    resamples: int = 1000
    """Resamples of test patients for the paired bootstrap."""
    min_test_roc_auc: float = 0.62
    subgroup_auc_floor: float = 0.55
    """A gender, race or age-band group with a lower test ROC-AUC is reported (warns, does not block)."""

    def gates(self) -> Gates:
        return Gates(
            min_test_roc_auc=self.min_test_roc_auc, subgroup_auc_floor=self.subgroup_auc_floor, margin=self.margin,
            confidence=self.confidence, non_inferiority_margin=self.non_inferiority_margin,
        )  # fmt: skip


def challenger_version(context: dg.AssetExecutionContext) -> str:
    """The version trained_model registered in this run or an earlier attempt of it; the newest one anywhere when the
    run did not train (promotion_decision materialized alone). Another retrain that overlapped this one, or finished
    before this run was retried, is not the challenger this run decides on."""
    trained = materialized_in_run_group(context.instance, context.run.run_id, TRAINED_MODEL)
    record = max(trained, key=lambda r: r.storage_id) if trained else context.instance.get_latest_materialization_event(TRAINED_MODEL)
    if record is None or record.asset_materialization is None:
        raise dg.Failure("trained_model has never been materialized; there is no challenger to decide on")
    return str(record.asset_materialization.metadata["model_version"].value)


def decided_in_run_group(context: dg.AssetExecutionContext, store, version: str) -> bool:
    """An earlier attempt of this run (one its automatic retry replaces) already recorded its decision on `version`."""
    run_ids = run_group(context.instance, context.run.run_id)
    found = store.query(
        "SELECT count(*) AS n FROM promotion_decisions WHERE challenger_version = $1 AND dagster_run_id IN "
        f"({', '.join(f'${i}' for i in range(2, len(run_ids) + 2))})",
        [version, *run_ids],
    )
    return bool(found.height and found["n"][0])


@dg.asset(
    deps=[TRAINED_MODEL],
    group_name="promotion",
    kinds={"mlflow"},
    description="Compares the challenger with production on the same test patients (paired bootstrap, DeLong); a "
    "challenger better on the evidence that passes the gates starts its rollout in `shadow` (the first model goes to "
    "`production`).",
)
def promotion_decision(
    context: dg.AssetExecutionContext, config: PromotionConfig, warehouse: WarehouseResource, mlflow: MlflowResource
) -> dg.MaterializeResult:
    from readmission_platform.lib.registry import PREVIOUS_PRODUCTION, ModelLoadError, decision_threshold
    from readmission_platform.lib.rollout import PRODUCTION, SHADOW, foresee

    registry = mlflow.registry()
    parts = warehouse.training_parts()
    test, prevalence = parts["test"], float(parts["train"]["readmitted_30d"].mean())
    y = labels(test)
    version = challenger_version(context)
    challenger = registry.load_model(version)
    threshold = decision_threshold(registry.version(version))
    challenger_scores = predict_probability(challenger, test)
    challenger_metrics = metrics.evaluate(y, challenger_scores, threshold=threshold, prevalence=prevalence)

    production = registry.production()
    # A retry of a run killed after it moved the alias: decide again against the version it replaced, the same way.
    already_promoted = production is not None and str(production.version) == version
    if already_promoted:
        previous = production.tags.get(PREVIOUS_PRODUCTION)
        production = registry.version(previous) if previous else None
    champion_version = champion_metrics = evidence = foreseen = None
    notes = []
    if production is not None:
        try:
            champion_scores = predict_probability(registry.load_model(production.version), test)
            champion_metrics = metrics.evaluate(y, champion_scores, threshold=decision_threshold(production), prevalence=prevalence)
            champion_version = str(production.version)
            evidence = paired.compare(
                test[PATIENT].to_numpy(), y, challenger_scores, champion_scores,
                resamples=config.resamples, level=config.confidence,
            )  # fmt: skip
            # How differently the two score the same patients: what the rollout judges the candidate's live scores by.
            foreseen = foresee(challenger_scores, threshold, champion_scores, decision_threshold(production))
        except ModelLoadError as error:
            # A production model that cannot be loaded cannot serve either: judge the challenger on the gates alone.
            notes.append(f"production v{production.version} could not be loaded ({error}); compared on the gates alone")
            context.log.error(notes[-1])

    subgroups = subgroup_tables(challenger, test, threshold=threshold)
    # The challenger's MLflow run keeps its test scores beside the validation ones it was chosen on, and its card.
    registered = registry.version(version)
    run_id = registered.run_id
    for name in REPORTED:
        registry.client.log_metric(run_id, f"test_{name}", challenger_metrics[name])
    registry.client.log_text(run_id, subgroups.write_csv(), "subgroups_test.csv")
    run = registry.client.get_run(run_id)
    card = build_card(
        version=version, family=registered.tags.get("family", run.data.params.get("family", "unknown")), threshold=threshold,
        params={k: v for k, v in run.data.params.items() if k not in ("family", "threshold")}, lineage=registered.tags,
        validation={k.removeprefix("validation_"): v for k, v in run.data.metrics.items() if k.startswith("validation_")},
        test=test, probability=challenger_scores, test_metrics=challenger_metrics, subgroups=subgroups,
    )  # fmt: skip
    log_card(registry.client, run_id, card)
    decision = decide(
        challenger_version=version,
        challenger_metrics=challenger_metrics,
        champion_version=champion_version,
        champion_metrics=champion_metrics,
        gates=config.gates(),
        subgroups=subgroups,
        now=datetime.now(UTC),
        evidence=evidence,
    )
    # A challenger that beat a serving production model is rolled out (`rollout_sensor`); the first model, or one
    # replacing a production model that cannot even load, serves at once.
    stage, replaced = None, None
    if decision.promoted:
        stage = SHADOW if champion_version is not None else PRODUCTION
        if already_promoted:
            stage = PRODUCTION
        elif stage == SHADOW:
            replaced = registry.start_shadow(version, reason=decision.reason)
        else:
            registry.promote(version, reason=decision.reason)
    registry.annotate(
        version,
        {"promotion.decision": "shadow" if stage == SHADOW else ("production" if stage else "not_promoted")}
        | ({f"promotion.{k}": v for k, v in evidence_figures(evidence).items()} if evidence else {})
        | (foreseen.as_tags() if foreseen else {}),
    )
    after = registry.production()
    production_metrics = challenger_metrics if stage == PRODUCTION else champion_metrics
    row = decision.as_row() | {
        "dagster_run_id": context.run.run_id,
        "production_version": str(after.version) if after else None,
        "candidate_version": version if stage == SHADOW else None,
        "rollout_stage": stage,
        "rollout_share": 0.0 if stage == SHADOW else None,
    }
    rows = [row]
    if replaced is not None:  # a candidate still in rollout gives way to the newer one: its end is a decision too
        rows.append(
            rollout_row(
                action=ROLLOUT_ABORTED, candidate=replaced, production=row["production_version"], stage=None, share=None,
                reason=f"v{replaced}'s rollout ends: replaced by v{version}, promoted on newer evidence", signals="",
                now=datetime.now(UTC),
            )
        )  # fmt: skip
    with warehouse.open() as store:
        if not decided_in_run_group(context, store, version):
            record_decisions(store, pl.DataFrame(rows, schema=DECISION_SCHEMA))
    context.log.info(decision.reason)

    compared = pl.DataFrame(
        {
            "metric": REPORTED,
            f"challenger v{version}": [round(challenger_metrics[m], 4) for m in REPORTED],
            **(
                {f"production v{champion_version}": [round(champion_metrics[m], 4) for m in REPORTED]}
                if champion_metrics
                else {}
            ),
        }
    )
    return dg.MaterializeResult(
        metadata={
            "promoted": decision.promoted,
            "reason": " ".join([decision.reason, *notes]),
            "challenger_version": version,
            "previous_production_version": champion_version or (str(production.version) if production else None),
            "production_version": str(after.version) if after else None,
            "rollout_stage": stage or "not promoted",
            **(evidence_metadata(evidence) if evidence else {"comparison": "no production model to compare with"}),
            "production_test_roc_auc": production_metrics["roc_auc"] if production_metrics else None,
            "production_test_brier": production_metrics["brier"] if production_metrics else None,
            "base_rate_brier": challenger_metrics["base_rate_brier"],
            "challenger_gate_failures": "; ".join(decision.gate_failures) or "none",
            "production_gate_failures": ("; ".join(gate_failures(production_metrics, config.gates())) or "none")
            if production_metrics
            else "no model in production",
            "subgroup_warnings": "; ".join(gate_warnings(subgroups, config.gates())) or "none",
            "test_rows": test.height,
            "metrics": dg.MetadataValue.md(markdown_table(compared)),
            "subgroups_test": dg.MetadataValue.md(
                markdown_table(subgroups.select("by", "group", "rows", "roc_auc", "brier", "positive_rate", "mean_predicted", "observed_rate"), limit=30)
            ),
            "mlflow_model": dg.MetadataValue.url(registry.version_url(version)),
            "challenger_test_roc_auc_interval": f"{card['test_metrics']['roc_auc']['lower']}-{card['test_metrics']['roc_auc']['upper']}",
            "challenger_calibration_slope": card["calibration"]["slope"],
            "model_card": dg.MetadataValue.md(to_markdown(card)),
        }
    )


def evidence_metadata(evidence: paired.PairedComparison) -> dict[str, object]:
    """The paired comparison as asset metadata: every figure, and a table a reviewer reads."""
    table = pl.DataFrame(
        [
            {"metric": d.metric, "challenger": round(d.a, 4), "production": round(d.b, 4), "difference": round(d.difference, 4),
             "lower": round(d.lower, 4), "upper": round(d.upper, 4), "p_value": round(d.p_value, 4)}
            for d in (evidence.roc_auc, evidence.brier)
        ]  # fmt: skip
    )
    figures = {k: v for k, v in evidence_figures(evidence).items() if k != "comparison"}
    return {"comparison": evidence.method, **figures, "paired_comparison": dg.MetadataValue.md(markdown_table(table))}
