"""Pack the production model into BentoML's model store and build the Bento from the repository's bentofile.yaml.

Runs in a process of its own (`python -m readmission_platform.serving.package`), because BentoML fixes its stores
(BENTOML_HOME) when it is first imported; the `serving_bento` asset and `readmission package` start it. Prints one
JSON object: the Bento tag, the packed model's tag and the registry version.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

PACKED_MODEL = "readmission-classifier"
MLFLOW_MODEL_FOLDER = "mlflow_model"
REPOSITORY = Path(__file__).resolve().parents[2]
BENTOFILE = REPOSITORY / "bentofile.yaml"


class PackagingError(Exception):
    """Nothing to package (no production version), or no bentofile.yaml to build from."""


def _source_digest(root: Path) -> str:
    """A digest of what a Bento takes from the repository: the package's code, bentofile.yaml, constraints.txt."""
    digest = hashlib.sha256()
    files = sorted((root / "readmission_platform").rglob("*.py")) + [root / "bentofile.yaml", root / "constraints.txt"]
    for path in files:
        if path.is_file():
            digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def _drop_unfinished(bentoml_home: Path) -> None:
    """Remove store entries a killed packer left without their manifest; BentoML refuses to list or load them."""
    for store, manifest in (("models", "model.yaml"), ("bentos", "bento.yaml")):
        for entry in (bentoml_home / store).glob("*/*/"):
            if not (entry / manifest).is_file():
                shutil.rmtree(entry)


def package(tracking_uri: str, artifact_root: str, bentoml_home: Path, bentofile: Path = BENTOFILE) -> dict[str, Any]:
    os.environ["BENTOML_HOME"] = str(bentoml_home)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    import bentoml
    import mlflow.artifacts
    import yaml

    from readmission_platform.lib.registry import ModelRegistry, _global_tracking_uri
    from readmission_platform.serving.model import describe

    if not bentofile.is_file():
        raise PackagingError(f"no {bentofile.name} at {bentofile}; build Bentos from a checkout of the repository")
    _drop_unfinished(bentoml_home)
    registry = ModelRegistry(tracking_uri, artifact_root)
    production = registry.production()
    if production is None:
        raise PackagingError(f"model '{registry.model_name}' has no 'production' version in {tracking_uri}; promote one first")
    version = str(production.version)
    info = describe(registry, version)
    tag = f"{PACKED_MODEL}:v{version}"
    try:
        packed = bentoml.models.get(tag)
    except bentoml.exceptions.NotFound:
        with tempfile.TemporaryDirectory() as folder, _global_tracking_uri(tracking_uri):
            source = registry.client.get_model_version_download_uri(registry.model_name, version)
            local = mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=folder)
            labels = {"registry_name": registry.model_name, "registry_version": version, "alias": "production",
                      "mlflow_run_id": production.run_id}  # fmt: skip
            with bentoml.models.create(tag, labels=labels, metadata={"info": json.dumps(info)}) as packed:
                shutil.copytree(local, packed.path_of(MLFLOW_MODEL_FOLDER))
    options = yaml.safe_load(bentofile.read_text())
    result = {"model": str(packed.tag), "version": version, "bentoml_home": str(bentoml_home)}
    try:
        latest = bentoml.bentos.get(f"{options['name']}:latest")
    except bentoml.exceptions.NotFound:
        latest = None
    source = _source_digest(bentofile.parent)
    if (
        latest is not None
        and [str(m.tag) for m in latest.info.models] == [str(packed.tag)]
        and latest.info.labels.get("source_digest") == source
    ):
        # Neither production nor the code changed since the last build (the challenger was not promoted): keep it.
        return result | {"bento": str(latest.tag), "built": False}
    options["labels"] = {**options.get("labels", {}), "model_version": version, "source_digest": source}
    bento = bentoml.bentos.build(**options, models=[str(packed.tag)], build_ctx=str(bentofile.parent))
    _keep_private(Path(bento.path))
    return result | {"bento": str(bento.tag), "built": True}


def _keep_private(folder: Path) -> None:
    """The build copies the repository's files with their own modes (0644): take group and others' bits away."""
    for path in (folder, *folder.rglob("*")):
        if not path.is_symlink():
            path.chmod(path.stat().st_mode & 0o700)


def main(argv: list[str] | None = None) -> int:
    from readmission_platform.settings import Settings

    settings = Settings.from_env()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tracking-uri", default=settings.mlflow_tracking_uri)
    parser.add_argument("--artifact-root", default=settings.mlflow_artifact_root.as_uri())
    parser.add_argument("--bentoml-home", type=Path, default=settings.bentoml_home)
    args = parser.parse_args(argv)
    try:
        result = package(args.tracking_uri, args.artifact_root, args.bentoml_home)
    except PackagingError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
