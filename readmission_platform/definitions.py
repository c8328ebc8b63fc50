import warnings
from pathlib import Path

import dagster as dg

from readmission_platform.defs.resources import (
    AlertmanagerResource,
    DegradationPolicy,
    LandingResource,
    MlflowResource,
    PredictionLogResource,
    RetrainPolicy,
    RolloutPolicyResource,
    ServingResource,
    WarehouseResource,
)
from readmission_platform.settings import RolloutSettings, Settings, keep_private

# Partitioned asset checks are a preview feature of Dagster 1.13; the platform relies on them knowingly.
warnings.filterwarnings("ignore", category=dg.PreviewWarning)

settings = Settings.from_env()
rollout = RolloutSettings.from_env()
# Code servers and run workers write the warehouse, MLflow's store and the Bentos.
keep_private(settings.home)


def from_variable(setting: str) -> str:
    """The setting as a `dg.EnvVar` of the variable that set it, so the UI names that variable; a default derived
    from READMISSION_HOME has no variable behind it (an EnvVar cannot compute one) and is bound as its value."""
    variable = settings.variables.get(setting)
    return dg.EnvVar(variable) if variable else getattr(settings, setting)


defs = dg.Definitions.merge(
    dg.load_from_defs_folder(path_within_project=Path(__file__).parent),
    dg.Definitions(
        resources={
            "warehouse": WarehouseResource(url=from_variable("warehouse_url")),
            "landing": LandingResource(folder=str(settings.landing_dir)),
            "mlflow": MlflowResource(
                tracking_uri=from_variable("mlflow_tracking_uri"), artifact_root=settings.mlflow_artifact_location
            ),
            "prediction_log": PredictionLogResource(url=from_variable("prediction_log_url"), patient_key=from_variable("patient_key")),
            "retrain_policy": RetrainPolicy(),
            "degradation_policy": DegradationPolicy(),
            "rollout_policy": RolloutPolicyResource(
                steps=list(rollout.steps), stage_seconds=rollout.stage_seconds, min_requests=rollout.min_requests
            ),
            "serving": ServingResource(bentoml_home=str(settings.bentoml_home)),
            "alertmanager": AlertmanagerResource(url=from_variable("alertmanager_url")),
        },
        # One process per run: steps share it instead of each importing the stack again.
        executor=dg.in_process_executor,
    ),
)
