"""Pack the production model into BentoML's model store and build the Bento from the repository's bentofile.yaml.

Runs in a process of its own (`python -m readmission_platform.serving.package`), because BentoML fixes its stores
(BENTOML_HOME) when it is first imported; the `serving_bento` asset and `readmission package` start it. Prints one
JSON object: the Bento tag, the packed model's tag and the registry version.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
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


@contextmanager
def _staging(bentoml_home: Path) -> Iterator[Path]:
    """An empty folder beside the stores, on their file system, for this packer alone; removed afterwards.

    Packers take turns on a lock the kernel releases when one is killed, so the next clears what a killed one left.
    """
    bentoml_home.mkdir(parents=True, exist_ok=True)
    with open(bentoml_home / ".packing.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        staging = bentoml_home / ".staging"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(mode=0o700)
        try:
            yield staging
        finally:
            shutil.rmtree(staging, ignore_errors=True)


def _publish(staged: Path, store: Path, name: str, version: str) -> None:
    """Move a finished entry from a staging store into `store` in one rename, then point the name's `latest` at it.

    BentoML copies an entry into its store file by file, so one killed mid-copy would be listed and served half-made.
    """
    target = store / name / version
    target.parent.mkdir(parents=True, exist_ok=True)
    os.rename(staged / name / version, target)
    pointer = target.parent / ".latest.new"
    pointer.write_text(version)
    os.replace(pointer, target.parent / "latest")


def package(tracking_uri: str, artifact_root: str | None, bentoml_home: Path, bentofile: Path = BENTOFILE) -> dict[str, Any]:
    os.environ["BENTOML_HOME"] = str(bentoml_home)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    import bentoml
    import mlflow.artifacts
    import yaml
    from bentoml._internal.bento import BentoStore
    from bentoml._internal.models import ModelStore

    from readmission_platform.lib.registry import ModelRegistry, _global_tracking_uri
    from readmission_platform.serving.model import describe

    if not bentofile.is_file():
        raise PackagingError(f"no {bentofile.name} at {bentofile}; build Bentos from a checkout of the repository")
    registry = ModelRegistry(tracking_uri, artifact_root)
    production = registry.production()
    if production is None:
        raise PackagingError(f"model '{registry.model_name}' has no 'production' version in {tracking_uri}; promote one first")
    version = str(production.version)
    info = describe(registry, version)
    tag = f"{PACKED_MODEL}:v{version}"
    with _staging(bentoml_home) as staging:
        try:
            packed = bentoml.models.get(tag)
        except bentoml.exceptions.NotFound:
            with tempfile.TemporaryDirectory() as folder, _global_tracking_uri(tracking_uri):
                source = registry.client.get_model_version_download_uri(registry.model_name, version)
                local = mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=folder)
                labels = {"registry_name": registry.model_name, "registry_version": version, "alias": "production",
                          "mlflow_run_id": production.run_id}  # fmt: skip
                with bentoml.models.create(
                    tag, labels=labels, metadata={"info": json.dumps(info)}, _model_store=ModelStore(staging / "models")
                ) as staged:
                    shutil.copytree(local, staged.path_of(MLFLOW_MODEL_FOLDER))
            _publish(staging / "models", bentoml_home / "models", PACKED_MODEL, staged.tag.version)
            packed = bentoml.models.get(tag)
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
        staged = bentoml.bentos.build(
            **options, models=[str(packed.tag)], build_ctx=str(bentofile.parent), _bento_store=BentoStore(staging / "bentos")
        )
        _keep_private(Path(staged.path))
        _publish(staging / "bentos", bentoml_home / "bentos", staged.tag.name, staged.tag.version)
    return result | {"bento": str(staged.tag), "built": True}


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
    parser.add_argument("--artifact-root", default=settings.mlflow_artifact_location)
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
