"""definitions.py binds a setting a variable gives as that variable, a default from READMISSION_HOME as its value."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

from readmission_platform.cli.instance import REPO_ROOT

# In a process of its own: loading the definitions narrows the umask and makes the home.
PROBE = """
import json
import dagster as dg
from readmission_platform.definitions import defs
from readmission_platform.defs.resources import MlflowResource, WarehouseResource

@dg.asset
def probe(warehouse: WarehouseResource, mlflow: MlflowResource) -> dg.MaterializeResult:
    return dg.MaterializeResult(metadata={"url": warehouse.url, "tracking_uri": mlflow.tracking_uri})

resources = {name: defs.resources[name] for name in ("warehouse", "mlflow")}
with dg.instance_for_test() as instance:
    result = dg.materialize([probe], resources=resources, instance=instance)
seen = result.asset_materializations_for_node("probe")[0].metadata
print(json.dumps({
    "bound": {
        "url": getattr(resources["warehouse"].url, "env_var_name", None),
        "tracking_uri": getattr(resources["mlflow"].tracking_uri, "env_var_name", None),
    },
    "in_run": {key: value.value for key, value in seen.items()},
}))
"""


def environment(tmp_path, **variables) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("READMISSION_", "MLFLOW_", "DAGSTER_"))}
    return env | {"READMISSION_HOME": str(tmp_path / "home"), **variables}


def probe(tmp_path, **variables) -> dict:
    env = environment(tmp_path, **variables)
    done = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.splitlines()[-1])


def test_a_setting_a_variable_gives_is_bound_as_that_variable_and_read_in_the_run(tmp_path):
    tracking = f"sqlite:///{tmp_path / 'elsewhere.db'}"
    seen = probe(tmp_path, MLFLOW_TRACKING_URI=tracking)
    assert seen["bound"] == {"url": None, "tracking_uri": "MLFLOW_TRACKING_URI"}
    assert seen["in_run"] == {"url": f"duckdb:///{tmp_path / 'home' / 'warehouse.duckdb'}", "tracking_uri": tracking}


def test_the_platform_variable_wins_over_mlflow_s_own(tmp_path):
    warehouse = f"duckdb:///{tmp_path / 'other.duckdb'}"
    seen = probe(
        tmp_path,
        READMISSION_WAREHOUSE_URL=warehouse,
        READMISSION_MLFLOW_TRACKING_URI="sqlite:///platform.db",
        MLFLOW_TRACKING_URI="sqlite:///mlflow.db",
    )
    assert seen["bound"] == {"url": "READMISSION_WAREHOUSE_URL", "tracking_uri": "READMISSION_MLFLOW_TRACKING_URI"}
    assert seen["in_run"] == {"url": warehouse, "tracking_uri": "sqlite:///platform.db"}


def test_every_sensor_runs_on_a_fresh_instance_without_being_started(tmp_path):
    (tmp_path / "dagster").mkdir()
    dagster = Path(sys.executable).with_name("dagster")
    done = subprocess.run(
        [str(dagster), "sensor", "list", "-w", str(REPO_ROOT / "workspace.yaml")],
        env=environment(tmp_path, DAGSTER_HOME=str(tmp_path / "dagster")),
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert dict(re.findall(r"Sensor: (\w+) \[(\w+)\]", done.stdout)) == {
        "landing_sensor": "RUNNING",
        "retrain_sensor": "RUNNING",
        "history_sensor": "RUNNING",
        "outcome_sensor": "RUNNING",
        "live_performance_sensor": "RUNNING",
        "rollout_sensor": "RUNNING",
        "alert_on_run_failure": "RUNNING",
        "alert_on_check_failure": "RUNNING",
    }
