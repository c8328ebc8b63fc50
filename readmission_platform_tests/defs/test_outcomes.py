"""Outcome files through the sensor and the `outcomes` asset into a real warehouse, matched to a real prediction log."""

from __future__ import annotations

import dagster as dg
import pytest

from readmission_platform.defs.outcomes.assets import outcomes
from readmission_platform.defs.outcomes.checks import check_outcomes_set_aside
from readmission_platform.defs.outcomes.sensors import outcome_sensor
from readmission_platform.defs.partitions import outcome_files
from readmission_platform.defs.resources import LandingResource, PredictionLogResource
from readmission_platform.lib.encounter import FIELDS
from readmission_platform.lib.outcomes import OUTCOMES, SET_ASIDE
from readmission_platform.serving.model import SMOKE_ENCOUNTERS
from readmission_platform.serving.prediction_log import write_predictions

GOOD = b"request_id,readmitted_30d,known_at\nr1,1,2026-03-01T08:00:00Z\nr2,0,2026-03-01T08:00:00Z\nr3,false,2026-03-02\n"


@pytest.fixture
def log_url(tmp_path):
    url = f"sqlite:///{tmp_path / 'predictions.sqlite'}"
    encounter = {name: SMOKE_ENCOUNTERS[0].get(name) for name in FIELDS}
    write_predictions(url, (
        {"request_id": f"r{i}", "endpoint": "predict", "model_name": "m", "model_version": "1", "probability": 0.1,
         "decision": False, "risk_band": "low", "inputs": encounter}
        for i in range(1, 6)
    ))  # fmt: skip
    return url


def land(platform, name: str, data: bytes, instance, cursor=None) -> dg.SensorResult:
    """Drop a file of outcomes and let the sensor make it a partition, as the daemon does."""
    (platform.landing / "outcomes").mkdir(exist_ok=True)
    (platform.landing / "outcomes" / name).write_bytes(data)
    context = dg.build_sensor_context(
        instance=instance, cursor=cursor, resources={"landing": LandingResource(folder=str(platform.landing))}
    )
    result = outcome_sensor(context)
    for request in result.dynamic_partitions_requests or []:
        instance.add_dynamic_partitions(request.partitions_def_name, list(request.partition_keys))
    return result


def ingest(platform, log_url: str, key: str, instance) -> dg.ExecuteInProcessResult:
    resources = platform.resources | {"prediction_log": PredictionLogResource(url=log_url)}
    return dg.materialize(
        [outcomes, check_outcomes_set_aside], partition_key=key, resources=resources, instance=instance, raise_on_error=False
    )


def test_a_good_file_becomes_a_partition_and_its_outcomes_are_stored(platform, log_url, instance):
    result = land(platform, "outcomes_0001.csv", GOOD, instance)
    assert [r.partition_key for r in result.run_requests] == ["outcomes_0001"]
    assert instance.get_dynamic_partitions(outcome_files.name) == ["outcomes_0001"]

    run = ingest(platform, log_url, "outcomes_0001", instance)

    assert run.success
    stored = platform.warehouse.query(f"SELECT request_id, readmitted_30d, known_at FROM {OUTCOMES} ORDER BY request_id")
    assert stored["request_id"].to_list() == ["r1", "r2", "r3"]
    assert stored["readmitted_30d"].to_list() == [True, False, False]
    assert str(stored["known_at"][2]) == "2026-03-02 00:00:00+00:00"
    (check,) = run.get_asset_check_evaluations()
    assert check.passed
    assert ingest(platform, log_url, "outcomes_0001", instance).success  # twice gives the same warehouse
    assert platform.warehouse.query(f"SELECT count(*) AS n FROM {OUTCOMES}")["n"][0] == 3


def test_a_second_outcome_and_an_unknown_request_are_set_aside_and_counted(platform, log_url, instance):
    first = land(platform, "outcomes_0001.csv", GOOD, instance)
    assert ingest(platform, log_url, "outcomes_0001", instance).success
    later = b"request_id,readmitted_30d,known_at\nr2,1,2026-03-05T00:00:00Z\nr4,1,2026-03-05T00:00:00Z\nr4,0,2026-03-06T00:00:00Z\nnobody,1,2026-03-05T00:00:00Z\n"
    land(platform, "outcomes_0002.csv", later, instance, first.cursor)

    run = ingest(platform, log_url, "outcomes_0002", instance)

    assert run.success
    stored = platform.warehouse.query(f"SELECT request_id, readmitted_30d, batch_id FROM {OUTCOMES} ORDER BY request_id")
    assert stored.rows() == [("r1", True, "outcomes_0001"), ("r2", False, "outcomes_0001"), ("r3", False, "outcomes_0001"), ("r4", True, "outcomes_0002")]
    aside = platform.warehouse.query(f"SELECT request_id, line_number, reason FROM {SET_ASIDE} ORDER BY line_number")
    assert aside["request_id"].to_list() == ["r2", "r4", "nobody"]
    assert aside["reason"][0] == "second outcome: request already has an outcome from outcomes_0001"
    assert aside["reason"][1] == "second outcome: request has an outcome on an earlier line of this file"
    assert aside["reason"][2].startswith("unknown request")
    materialization = run.asset_materializations_for_node("outcomes")[0]
    assert materialization.metadata["set_aside"].value == 3 and materialization.metadata["dagster/row_count"].value == 1
    (check,) = run.get_asset_check_evaluations()
    assert not check.passed and check.description.startswith("3 outcomes set aside (2 second outcome, 1 unknown request)")


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"request,readmitted_30d,known_at\nr1,1,2026-03-01\n", "expected exactly one of ['request_id', 'encounter_id']"),
        (b"request_id,readmitted_30d,known_at\nr1,yes,2026-03-01\n", "column 'readmitted_30d' holds yes on 1 lines (line 2)"),
        (b"request_id,readmitted_30d,known_at\nr1,1,last week\n", "column 'known_at' holds last week"),
        (b"encounter_id,readmitted_30d,known_at\nE12,1,2026-03-01\n", "column 'encounter_id' holds E12"),
        (b"request_id,readmitted_30d,known_at\n", "has a header and no outcomes"),
        (b'request_id,readmitted_30d,known_at\nr1,1,2026-03-01,x\nr2,"1,2026-03-01\n', "(line 2 has 4 fields, line 3 has a quote"),
        (b"\xff\xfe", "is not UTF-8"),
    ],
)
def test_a_malformed_file_fails_naming_the_problem_and_stores_nothing(platform, log_url, instance, data, message):
    first = land(platform, "outcomes_0001.csv", GOOD, instance)
    assert ingest(platform, log_url, "outcomes_0001", instance).success
    land(platform, "outcomes_0002.csv", data, instance, first.cursor)

    run = ingest(platform, log_url, "outcomes_0002", instance)

    assert not run.success
    failure = next(e for e in run.all_events if e.event_type == dg.DagsterEventType.STEP_FAILURE)
    assert message in failure.step_failure_data.error.message
    assert "nothing was written" in failure.step_failure_data.error.message
    stored = platform.warehouse.query(f"SELECT batch_id, count(*) AS n FROM {OUTCOMES} GROUP BY batch_id")
    assert stored.rows() == [("outcomes_0001", 3)]


def test_an_encounter_id_is_matched_as_the_request_id_it_was_sent_as(platform, tmp_path, instance):
    url = f"sqlite:///{tmp_path / 'by_encounter.sqlite'}"
    encounter = {name: SMOKE_ENCOUNTERS[0].get(name) for name in FIELDS}
    write_predictions(url, [{"request_id": "2278392", "endpoint": "predict", "model_name": "m", "model_version": "1",
                             "probability": 0.3, "decision": True, "risk_band": "high", "inputs": encounter}])  # fmt: skip
    land(platform, "outcomes_0001.csv", b"encounter_id,readmitted_30d,known_at\n2278392,1,2026-03-01\n", instance)

    assert ingest(platform, url, "outcomes_0001", instance).success
    assert platform.warehouse.query(f"SELECT request_id FROM {OUTCOMES}")["request_id"].to_list() == ["2278392"]
