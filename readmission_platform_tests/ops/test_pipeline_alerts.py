"""The pipeline's sensors post failed runs and failed checks to a real Alertmanager, which routes them to the webhook."""

from __future__ import annotations

import dagster as dg

from readmission_platform.defs.monitoring.sensors import alert_on_check_failure, alert_on_run_failure
from readmission_platform.defs.resources import AlertmanagerResource
from readmission_platform.ops.spec import PIPELINE_ALERTS


@dg.asset
def broken_batch() -> None:
    raise ValueError("column 'age' holds '[110-120)'")


@dg.asset
def checked_batch() -> int:
    return 1


@dg.asset_check(asset=checked_batch, blocking=True)
def check_checked_batch_rows() -> dg.AssetCheckResult:
    return dg.AssetCheckResult(passed=False, severity=dg.AssetCheckSeverity.ERROR, description="0 rows; expected some")


@dg.asset_check(asset=checked_batch)
def check_checked_batch_share() -> dg.AssetCheckResult:
    return dg.AssetCheckResult(passed=False, severity=dg.AssetCheckSeverity.WARN, description="share 3 % over 1 %")


@dg.asset_check(asset=checked_batch)
def check_checked_batch_columns() -> dg.AssetCheckResult:
    return dg.AssetCheckResult(passed=True)


CHECKED = dg.Definitions(assets=[checked_batch], asset_checks=[check_checked_batch_rows, check_checked_batch_share,
                                                                check_checked_batch_columns])  # fmt: skip


def test_a_failed_run_reaches_the_webhook_through_alertmanager(alertmanager, webhook):
    with dg.instance_for_test() as instance:
        result = dg.materialize([broken_batch], instance=instance, raise_on_error=False)
        run = instance.get_run_by_id(result.run_id)
        failure = instance.get_records_for_run(result.run_id, of_type=dg.DagsterEventType.RUN_FAILURE).records[0]
        context = dg.build_run_status_sensor_context(
            sensor_name="alert_on_run_failure", dagster_instance=instance, dagster_run=run,
            dagster_event=failure.event_log_entry.dagster_event, resources={"alertmanager": AlertmanagerResource(url=alertmanager)},
        ).for_run_failure()  # fmt: skip
        alert_on_run_failure(context)
    alert = webhook.wait_for(PIPELINE_ALERTS["run"].name, timeout=30, run_id=result.run_id)
    assert alert["labels"]["severity"] == "warning" and alert["labels"]["job_name"] == result.job_def.name
    assert alert["annotations"]["runbook_url"] == "docs/runbooks/ReadmissionPipelineRunFailed.md"
    assert alert["generatorURL"].endswith(f"/runs/{result.run_id}")
    assert {n["receiver"] for n in webhook.notifications} == {"ticket"}


def test_failed_checks_reach_the_webhook_by_severity_and_passed_ones_do_not(alertmanager, webhook):
    resources = {"alertmanager": AlertmanagerResource(url=alertmanager)}
    with dg.instance_for_test() as instance:
        dg.materialize([checked_batch], instance=instance, raise_on_error=False, selection=[checked_batch])
        context = dg.build_sensor_context(instance=instance, resources=resources, definitions=CHECKED)
        assert "from now on" in alert_on_check_failure(context).skip_message  # the history is not posted
        result = dg.materialize([checked_batch, check_checked_batch_rows, check_checked_batch_share,
                                 check_checked_batch_columns], instance=instance, raise_on_error=False)  # fmt: skip
        context = dg.build_sensor_context(instance=instance, cursor=context.cursor, resources=resources, definitions=CHECKED)
        assert alert_on_check_failure(context).skip_message == "2 failed checks posted to Alertmanager"
        context = dg.build_sensor_context(instance=instance, cursor=context.cursor, resources=resources, definitions=CHECKED)
        assert alert_on_check_failure(context).skip_message == "0 checks evaluated since the last tick, none failed"
    blocking = webhook.wait_for(PIPELINE_ALERTS["check"].name, timeout=30, check="check_checked_batch_rows")
    warning = webhook.wait_for(PIPELINE_ALERTS["check"].name, timeout=30, check="check_checked_batch_share")
    assert (blocking["labels"]["severity"], warning["labels"]["severity"]) == ("critical", "warning")
    assert blocking["annotations"]["description"] == "0 rows; expected some"
    assert blocking["generatorURL"].endswith(f"/runs/{result.run_id}")
    assert not [a for a in webhook.alerts() if a["labels"].get("check") == "check_checked_batch_columns"]
    assert {n["receiver"] for n in webhook.notifications} == {"page", "ticket"}


def test_without_an_alertmanager_url_the_sensors_skip_and_say_why():
    with dg.instance_for_test() as instance:
        context = dg.build_sensor_context(instance=instance, resources={"alertmanager": AlertmanagerResource()},
                                          definitions=CHECKED)  # fmt: skip
        alert_on_check_failure(context)
        dg.materialize([checked_batch, check_checked_batch_rows], instance=instance, raise_on_error=False)
        assert alert_on_check_failure(context).skip_message == (
            "1 checks failed; no Alertmanager URL is set (READMISSION_ALERTMANAGER_URL)"
        )
