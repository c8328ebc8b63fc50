import dagster as dg

from readmission_platform.defs.promotion.assets import promotion_decision


def _latest(context: dg.AssetCheckExecutionContext) -> dict:
    event = context.instance.get_latest_materialization_event(promotion_decision.key)
    if event is None or event.asset_materialization is None:
        return {}
    return {key: getattr(value, "value", value) for key, value in event.asset_materialization.metadata.items()}


@dg.asset_check(
    asset=promotion_decision,
    blocking=True,
    description="The model behind `production` passes the gates on the current test patients: "
    "ROC-AUC at least the floor, Brier score below the base-rate Brier score.",
)
def check_promotion_decision_gates(context: dg.AssetCheckExecutionContext) -> dg.AssetCheckResult:
    decision = _latest(context)
    failures = decision.get("production_gate_failures", "promotion_decision has not run")
    version = decision.get("production_version")
    return dg.AssetCheckResult(
        passed=failures == "none",
        description=f"production v{version} passes the gates"
        if failures == "none"
        else f"production {('v' + str(version)) if version else '(none)'} does not pass the gates: {failures}",
        metadata={
            "production_version": str(version),
            "test_roc_auc": decision.get("production_test_roc_auc"),
            "test_brier": decision.get("production_test_brier"),
            "base_rate_brier": decision.get("base_rate_brier"),
        },
    )


@dg.asset_check(
    asset=promotion_decision,
    description="No gender, race or age-band group of the test patients gets a ROC-AUC below the floor (warns).",
)
def check_promotion_decision_subgroups(context: dg.AssetCheckExecutionContext) -> dg.AssetCheckResult:
    warnings = _latest(context).get("subgroup_warnings", "promotion_decision has not run")
    return dg.AssetCheckResult(
        passed=warnings == "none",
        severity=dg.AssetCheckSeverity.WARN,
        description="every subgroup at or above the floor" if warnings == "none" else warnings,
    )
