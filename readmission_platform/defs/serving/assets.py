import json
import os
import subprocess
import sys

import dagster as dg

from readmission_platform.defs.promotion.assets import promotion_decision
from readmission_platform.defs.resources import MlflowResource, ServingResource


@dg.asset(
    deps=[promotion_decision],
    group_name="serving",
    kinds={"bentoml"},
    description="The production model packed into BentoML's model store and a Bento built from bentofile.yaml.",
)
def serving_bento(context: dg.AssetExecutionContext, mlflow: MlflowResource, serving: ServingResource) -> dg.MaterializeResult:
    # BentoML fixes its stores when first imported, so the packing runs in a process of its own.
    command = [
        sys.executable, "-m", "readmission_platform.serving.package",
        "--tracking-uri", mlflow.tracking_uri, "--bentoml-home", serving.bentoml_home,
        *(["--artifact-root", mlflow.artifact_root] if mlflow.artifact_root else []),
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "BENTOML_HOME": serving.bentoml_home})
    if done.returncode < 0:
        # Killed by a signal: a crash, not a bad model, so pack again; the killed packer left nothing in the stores.
        raise dg.RetryRequested(max_retries=2, seconds_to_wait=1) from None
    if done.returncode != 0:
        raise dg.Failure(
            description=f"packaging the production model failed (exit {done.returncode}): {done.stderr.strip()[-2000:]}"
        )
    result = json.loads(done.stdout.strip().splitlines()[-1])
    context.log.info(
        f"built Bento {result['bento']} with {result['model']}"
        if result["built"]
        else f"production is still {result['model']}: Bento {result['bento']} already packs it"
    )
    return dg.MaterializeResult(
        metadata={
            "bento_tag": result["bento"],
            "bentoml_model": result["model"],
            "model_version": result["version"],
            "built": result["built"],
            "bentoml_home": result["bentoml_home"],
            "serve": dg.MetadataValue.md(
                f"`BENTOML_HOME={result['bentoml_home']} bentoml serve {result['bento']}` or `readmission serve`"
            ),
        }
    )
