import warnings
from pathlib import Path

import dagster as dg

from readmission_platform.defs.resources import (
    LandingResource,
    MlflowResource,
    RetrainPolicy,
    ServingResource,
    WarehouseResource,
)
from readmission_platform.settings import Settings, keep_private

# Partitioned asset checks are a preview feature of Dagster 1.13; the platform relies on them knowingly.
warnings.filterwarnings("ignore", category=dg.PreviewWarning)

settings = Settings.from_env()
# Code servers and run workers write the warehouse, MLflow's store and the Bentos.
keep_private(settings.home)

defs = dg.Definitions.merge(
    dg.load_from_defs_folder(path_within_project=Path(__file__).parent),
    dg.Definitions(
        resources={
            "warehouse": WarehouseResource(url=settings.warehouse_url),
            "landing": LandingResource(folder=str(settings.landing_dir)),
            "mlflow": MlflowResource(
                tracking_uri=settings.mlflow_tracking_uri, artifact_root=settings.mlflow_artifact_root.as_uri()
            ),
            "retrain_policy": RetrainPolicy(),
            "serving": ServingResource(bentoml_home=str(settings.bentoml_home)),
        },
        # One process per run: steps share it instead of each importing the stack again.
        executor=dg.in_process_executor,
    ),
)
