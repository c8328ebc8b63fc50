"""The model registry: one MLflow run per candidate, registered versions of the classifier, and the alias that serves.

Which version serves is the registry alias `production` (MLflow 3 aliases; stages are never used). Every promotion and
rollback leaves tags on the versions involved, so the registry alone tells who replaced whom, when and why.
"""

from __future__ import annotations

import fcntl
import math
import shutil
import tempfile
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from urllib.parse import quote

import mlflow
import mlflow.sklearn
import pandas as pd
from mlflow.entities import Metric, Param
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.models import infer_signature
from mlflow.protos.databricks_pb2 import RESOURCE_ALREADY_EXISTS, RESOURCE_DOES_NOT_EXIST, ErrorCode
from sklearn.pipeline import Pipeline

from readmission_platform.settings import MLFLOW_UI_PORT

MODEL_NAME = "readmission-classifier"
EXPERIMENT = "readmission"
PRODUCTION = "production"
SHADOW = "shadow"
CANARY = "canary"
ROLLOUT_SHARE = "rollout.share"
ROLLOUT_STAGE_STARTED_AT = "rollout.stage_started_at"
# Where `mlflow ui` (and `readmission mlflow-ui`) serve by default.
UI_URL = f"http://127.0.0.1:{MLFLOW_UI_PORT}"
# The name of the logged model inside a candidate's run.
MODEL_ARTIFACT = "model"
INPUT_EXAMPLE_ROWS = 5

THRESHOLD_TAG = "threshold"
# The batches a version was trained on, comma-separated: drift and retraining compare new batches with them.
BATCHES_TAG = "batch_ids"
# The Dagster run group (the root run's id) that trained a candidate or registered a version: a run and its retries.
RUN_GROUP_TAG = "dagster_run_group"
PROMOTED_AT, PROMOTION_REASON, PREVIOUS_PRODUCTION = "promoted_at", "promotion_reason", "previous_production"
REPLACED_AT, REPLACED_BY, REPLACED_REASON = "replaced_at", "replaced_by", "replaced_reason"
ROLLED_BACK_AT, ROLLED_BACK_TO, ROLLED_BACK_REASON = "rolled_back_at", "rolled_back_to", "rolled_back_reason"
RESTORED_AT, RESTORED_FROM, RESTORED_REASON = "restored_at", "restored_from", "restored_reason"
# On a candidate version: when it entered the rollout and why, and when and why it left it without reaching production.
ROLLOUT_STARTED_AT, ROLLOUT_REASON = "rollout_started_at", "rollout_reason"
ROLLOUT_ENDED_AT, ROLLOUT_END_REASON = "rollout_ended_at", "rollout_end_reason"


@dataclass(frozen=True)
class Rollout:
    """The candidate being rolled out: its version, its stage (SHADOW or CANARY), the canary's share of requests (0 in
    shadow) and when the current stage or step began."""

    version: str
    stage: str
    share: float
    started_at: datetime | None


class RegistryError(Exception):
    """The registry cannot do what was asked: nothing to roll back to, an unknown version, a misconfigured store."""


class RolloutMoved(RegistryError):
    """The rollout a step was judged on is no longer the one under way (another candidate took its place, or it ended)."""


class ModelLoadError(RegistryError):
    """A registered version's model cannot be loaded: its artifacts are missing or corrupt."""


def mlflow_store_uris(home: Path) -> tuple[str, str]:
    """The default store under `home`: a SQLite tracking URI and a file URI for artifacts (folder created)."""
    folder = home.expanduser().resolve() / "mlflow"
    folder.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{folder / 'mlflow.db'}", (folder / "artifacts").as_uri()


def decision_threshold(version: ModelVersion) -> float:
    """The probability cut stored with a registered version by `ModelRegistry.register`."""
    if THRESHOLD_TAG not in version.tags:
        raise RegistryError(
            f"version {version.version} of model '{version.name}' has no '{THRESHOLD_TAG}' tag; "
            "register versions with ModelRegistry.register, which stores it"
        )
    return float(version.tags[THRESHOLD_TAG])


def trained_batches(version: ModelVersion | None) -> list[str]:
    """The batch ids a registered version was trained on; none for no version."""
    return [b for b in version.tags.get(BATCHES_TAG, "").split(",") if b] if version is not None else []


@dataclass(frozen=True)
class RunLink:
    """Where a candidate's run lives in the MLflow store and its UI."""

    run_id: str
    experiment_id: str

    @property
    def ui_path(self) -> str:
        """The run's page, relative to the MLflow UI's address."""
        return f"#/experiments/{self.experiment_id}/runs/{self.run_id}"


def _timestamp(when: datetime | None) -> str:
    when = when or datetime.now(UTC)
    if when.tzinfo is None:
        raise ValueError(f"time {when.isoformat()} has no time zone; pass a timezone-aware datetime")
    return when.isoformat()


def _reason(reason: str) -> str:
    if not reason.strip():
        raise ValueError("the reason is empty; give a sentence a reviewer can read later")
    return reason.strip()


def _artifact_files(artifacts: Mapping[str, Path]) -> dict[PurePosixPath, Path]:
    """Name inside the run → local file; a name without an extension takes the file's ('roc' → 'roc.png')."""
    files = {}
    for name, path in artifacts.items():
        target = PurePosixPath(name)
        if not name or target.is_absolute() or ".." in target.parts:
            raise ValueError(f"artifact name {name!r} must be a relative path inside the run, like 'plots/roc.png'")
        if not Path(path).is_file():
            raise FileNotFoundError(f"artifact '{name}' should be the file {path}, which does not exist")
        target = target if target.suffix else target.with_suffix(Path(path).suffix)
        if target in files:
            raise ValueError(f"two artifacts would both be stored as '{target}'; give them distinct names")
        files[target] = Path(path)
    return files


def _has_code(error: MlflowException, code: int) -> bool:
    return error.error_code == ErrorCode.Name(code)


@contextmanager
def _global_tracking_uri(uri: str) -> Iterator[None]:
    """Point MLflow's process-global tracking URI at `uri` inside the block, then restore what was there."""
    previous = mlflow.get_tracking_uri() if mlflow.is_tracking_uri_set() else None
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(previous)


@contextmanager
def _first_use(tracking_uri: str) -> Iterator[None]:
    """For a SQLite store: one process at a time, so that two processes (a run's steps, a sensor's runs, serving
    workers) opening a new store do not both run MLflow's migrations on it, which fails one of them."""
    if not tracking_uri.startswith("sqlite:///"):
        yield
        return
    path = Path(tracking_uri.removeprefix("sqlite:///"))
    path.parent.mkdir(parents=True, exist_ok=True)  # SQLite creates the database file but not its folder
    with open(path.with_name(path.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


class ModelRegistry:
    """Candidates, versions and the production alias of one registered model, in the MLflow store at `tracking_uri`.

    Works on any store MLflow supports (sqlite:///…, postgresql://…; MLflow creates its tables). Everything goes
    through one MlflowClient bound to this store, except two MLflow calls that only use the process-global tracking
    URI: `mlflow.sklearn.log_model` (with the active run) and the registry's lookup of a logged model. `log_candidate`
    and `register` point the global URI here for those calls and restore it afterwards, so do not use registries of
    two stores from two threads of one process at once.
    `artifact_root` (a file URI or local path, s3://…) is where the experiment keeps artifacts when this creates it
    (None: the store's default); `ui_url` is the MLflow UI that `run_url` and `version_url` point into.
    """

    def __init__(
        self,
        tracking_uri: str,
        artifact_root: str | None,
        model_name: str = MODEL_NAME,
        experiment: str = EXPERIMENT,
        ui_url: str = UI_URL,
    ) -> None:
        self.tracking_uri = tracking_uri
        self.model_name = model_name
        self.ui_url = ui_url.rstrip("/")
        with _first_use(tracking_uri):  # opening the store makes MLflow create (migrate) its tables if missing
            # An explicit registry URI, so MLFLOW_REGISTRY_URI or mlflow.set_registry_uri cannot send versions elsewhere.
            self.client = mlflow.MlflowClient(tracking_uri, registry_uri=tracking_uri)
            self.experiment_id = self._ensure_experiment(experiment, artifact_root)

    def _ensure_experiment(self, name: str, artifact_root: str | None) -> str:
        found = self.client.get_experiment_by_name(name)
        if found is None:
            try:
                return self.client.create_experiment(name, artifact_location=artifact_root)
            except MlflowException as error:
                # Another process (a parallel Dagster step) created it first.
                if not _has_code(error, RESOURCE_ALREADY_EXISTS):
                    raise
                found = self.client.get_experiment_by_name(name)
        if found.lifecycle_stage != "active":
            raise RegistryError(
                f"experiment '{name}' in {self.tracking_uri} is deleted; restore it (mlflow experiments restore "
                f"--experiment-id {found.experiment_id}) or use another experiment name"
            )
        return found.experiment_id

    def log_candidate(
        self,
        model: Pipeline | None,
        *,
        params: Mapping[str, object],
        metrics: Mapping[str, float],
        tags: Mapping[str, object],
        artifacts: Mapping[str, Path] | None,
        input_example: pd.DataFrame | None,
        run_name: str,
    ) -> str:
        """Log one trained candidate as a finished run: params, metrics, tags, extra files and the model; its run id.

        `artifacts` maps a name inside the run ('plots/roc.png', or 'roc' to keep the file's extension) to a local
        file. The model's signature is inferred from the first rows of `input_example` and their predict_proba output.
        Without a model (a candidate not chosen, which can never be registered), the run keeps its figures only.
        """
        if (active := mlflow.active_run()) is not None:
            raise RegistryError(
                f"MLflow run {active.info.run_id} is active in this process; end it first, as each candidate gets a "
                "run of its own"
            )
        if model is not None and input_example is None:
            raise ValueError("a logged model needs an input_example to infer its signature from; give the first rows of the training frame")
        files = _artifact_files(artifacts or {})

        run_id = self.client.create_run(
            self.experiment_id, run_name=run_name, tags={k: str(v) for k, v in tags.items()}
        ).info.run_id
        # The run is resumed as the active run so log_model attaches the model to it; leaving the block ends the run
        # as FINISHED, or FAILED if anything inside raised.
        with _global_tracking_uri(self.tracking_uri), mlflow.start_run(run_id=run_id):
            now = int(time.time() * 1000)
            self.client.log_batch(
                run_id,
                metrics=[Metric(key, float(value), now, 0) for key, value in metrics.items()],
                params=[Param(key, str(value)) for key, value in params.items()],
            )
            if files:
                with tempfile.TemporaryDirectory() as folder:
                    for name, path in files.items():
                        (Path(folder) / name).parent.mkdir(parents=True, exist_ok=True)
                        shutil.copyfile(path, Path(folder) / name)
                    self.client.log_artifacts(run_id, folder)
            if model is None:
                return run_id
            example = input_example.head(INPUT_EXAMPLE_ROWS)
            signature = infer_signature(example, model.predict_proba(example))
            # skops only loads types it is told to trust. These are the types of a model this process has just
            # trained, e.g. sklearn's calibration and tree internals; the list is stored in the MLmodel file for loading.
            # Imported here: it takes a noticeable part of a second, and most users of the registry log no model.
            import skops.io

            trusted_types = skops.io.get_untrusted_types(data=skops.io.dumps(model))
            mlflow.sklearn.log_model(
                model,
                name=MODEL_ARTIFACT,
                serialization_format=mlflow.sklearn.SERIALIZATION_FORMAT_SKOPS,
                skops_trusted_types=trusted_types,
                signature=signature,
                input_example=example,
                pyfunc_predict_fn="predict_proba",
                # Given explicitly: inferring them starts a subprocess that takes seconds per model.
                pip_requirements=mlflow.sklearn.get_default_pip_requirements(include_skops=True),
            )
        return run_id

    def register(self, run_id: str, *, threshold: float, tags: Mapping[str, object]) -> str:
        """Register the model logged by `run_id` as a new version, with its decision threshold; the version number."""
        if not (math.isfinite(threshold) and 0.0 <= threshold <= 1.0):
            raise ValueError(f"threshold {threshold} is not a probability; expected a number in [0, 1]")
        run = self.client.get_run(run_id)
        outputs = run.outputs.model_outputs if run.outputs else []
        if len(outputs) != 1:
            raise RegistryError(
                f"run {run_id} logged {len(outputs)} models; expected exactly one, as ModelRegistry.log_candidate logs"
            )
        model_id = outputs[0].model_id
        try:
            self.client.create_registered_model(
                self.model_name, description="Probability of readmission within 30 days of a diabetic encounter."
            )
        except MlflowException as error:
            if not _has_code(error, RESOURCE_ALREADY_EXISTS):
                raise
        # A database-backed registry resolves the `models:/<model_id>` source through a client on the process-global
        # tracking URI (a TODO in MLflow's SqlAlchemyStore.create_model_version), so it must point at this store.
        with _global_tracking_uri(self.tracking_uri):
            version = self.client.create_model_version(
                self.model_name,
                source=f"models:/{model_id}",
                run_id=run_id,
                model_id=model_id,
                tags={**{k: str(v) for k, v in tags.items()}, THRESHOLD_TAG: repr(float(threshold))},
                description=(
                    f"Candidate '{run.info.run_name}' of run {run_id}; flags a readmission when the predicted "
                    f"probability is at least {threshold:.4f}."
                ),
            )
        return str(version.version)

    def end_killed_runs(self, tags: Mapping[str, str]) -> list[str]:
        """Mark the runs carrying `tags` that are still RUNNING, as a killed process leaves them, KILLED; their ids."""
        query = " and ".join([*(f"tags.`{k}` = '{v}'" for k, v in tags.items()), "attributes.status = 'RUNNING'"])
        killed = [run.info.run_id for run in self.client.search_runs([self.experiment_id], query)]
        for run_id in killed:
            self.client.set_terminated(run_id, "KILLED")
        return killed

    def registered_by(self, run_group: str) -> ModelVersion | None:
        """The version a Dagster run group registered (`register` with RUN_GROUP_TAG), if it did."""
        found = self.client.search_model_versions(f"name = '{self.model_name}' and tags.`{RUN_GROUP_TAG}` = '{run_group}'")
        return min(found, key=lambda v: int(v.version)) if found else None

    def version(self, version: str) -> ModelVersion:
        """One registered version, with its tags and aliases."""
        try:
            return self.client.get_model_version(self.model_name, str(version))
        except MlflowException as error:
            if not _has_code(error, RESOURCE_DOES_NOT_EXIST):
                raise
            known = ", ".join(str(v.version) for v in self.versions()) or "none"
            raise RegistryError(
                f"model '{self.model_name}' has no version {version}; registered versions: {known}"
            ) from error

    def versions(self) -> list[ModelVersion]:
        """Every registered version, newest first."""
        found = self.client.search_model_versions(f"name = '{self.model_name}'")
        return sorted(found, key=lambda v: int(v.version), reverse=True)

    def production(self) -> ModelVersion | None:
        """The version behind the alias `production`, or None before the first promotion."""
        try:
            aliases = self.client.get_registered_model(self.model_name).aliases
        except MlflowException as error:
            if not _has_code(error, RESOURCE_DOES_NOT_EXIST):
                raise
            return None
        return self.version(aliases[PRODUCTION]) if PRODUCTION in aliases else None

    def rollout(self) -> Rollout | None:
        """The candidate behind `shadow` or `canary`, or None when no rollout is under way."""
        try:
            model = self.client.get_registered_model(self.model_name)
        except MlflowException as error:
            if not _has_code(error, RESOURCE_DOES_NOT_EXIST):
                raise
            return None
        stages = [stage for stage in (SHADOW, CANARY) if stage in model.aliases]
        if len(stages) > 1 and model.aliases[SHADOW] == model.aliases[CANARY]:
            stages = [CANARY]  # a move from shadow to canary under way (`_set_stage`): the later stage
        # A candidate alias on production's version is what a finished rollout left if its end was cut short.
        if not stages or model.aliases[stages[0]] == model.aliases.get(PRODUCTION):
            return None
        if len(stages) > 1:
            raise RegistryError(
                f"model '{self.model_name}' has both '{SHADOW}' (v{model.aliases[SHADOW]}) and '{CANARY}' "
                f"(v{model.aliases[CANARY]}); at most one candidate may be rolled out: abort it (`readmission rollout abort`)"
            )
        started = model.tags.get(ROLLOUT_STAGE_STARTED_AT)
        share = float(model.tags.get(ROLLOUT_SHARE) or 0) if stages[0] == CANARY else 0.0
        return Rollout(
            version=str(model.aliases[stages[0]]),
            stage=stages[0],
            share=share,
            started_at=datetime.fromisoformat(started) if started else None,
        )

    def start_shadow(self, version: str, *, reason: str, when: datetime | None = None) -> str | None:
        """Put `version` behind `shadow` (scored beside production, never answering); the candidate it replaces, if any.

        A newer promoted challenger takes the place of a candidate still in rollout, which is ended with `reason`.
        """
        reason, at = _reason(reason), _timestamp(when)
        target = str(self.version(version).version)
        production = self.production()
        if production is not None and str(production.version) == target:
            raise RegistryError(f"version {target} of model '{self.model_name}' is in production; it cannot be a candidate too")
        current = self.rollout()
        if current is not None and current.version == target:
            return None
        if current is not None:
            self.end_rollout(reason=f"replaced by v{target}: {reason}", when=when)
        self._tag(target, {ROLLOUT_STARTED_AT: at, ROLLOUT_REASON: reason})
        self._set_stage(SHADOW, target, 0.0, at)
        return current.version if current is not None else None

    def set_canary(self, share: float, *, version: str | None = None, when: datetime | None = None) -> Rollout:
        """Move the candidate to `canary` answering `share` of requests (from `shadow`, or from a smaller share).
        `version`: the candidate the step was judged on (`RolloutMoved`, and nothing done, if another is now)."""
        if not (math.isfinite(share) and 0.0 < share <= 1.0):
            raise ValueError(f"share {share} is not a share of requests; expected a number in (0, 1]")
        current = self._candidate(version)
        at = _timestamp(when)
        self._set_stage(CANARY, current.version, share, at)
        return Rollout(current.version, CANARY, share, datetime.fromisoformat(at))

    def finish_rollout(self, *, reason: str, version: str | None = None, when: datetime | None = None) -> str | None:
        """Make the candidate `production` (as `promote` does) and end its rollout; the version it replaced, if any.
        `version` as for `set_canary`."""
        current = self._candidate(version)
        replaced = self.promote(current.version, reason=reason, when=when)
        self._clear_stage()
        return replaced

    def end_rollout(self, *, reason: str, version: str | None = None, when: datetime | None = None) -> str:
        """Take the candidate out of rollout (production alone answers again), recording why on it; its version.
        `version` as for `set_canary`."""
        reason, at = _reason(reason), _timestamp(when)
        current = self._candidate(version)
        self._clear_stage()
        self._tag(current.version, {ROLLOUT_ENDED_AT: at, ROLLOUT_END_REASON: reason})
        return current.version

    def _candidate(self, version: str | None = None) -> Rollout:
        current = self.rollout()
        if current is None:
            if version is not None:
                raise RolloutMoved(f"v{version}'s rollout is no longer under way; nothing done")
            raise RegistryError(f"model '{self.model_name}' has no '{SHADOW}' or '{CANARY}' alias; no rollout is under way")
        if version is not None and current.version != str(version):
            raise RolloutMoved(f"the rollout is now of v{current.version}, not of v{version}, which the step was judged on; nothing done")
        return current

    def _set_stage(self, stage: str, version: str, share: float, at: str) -> None:
        # The share and start time first, then this stage's alias set, then the other alias removed: a process killed
        # in between leaves the candidate under both, which readers take as the later stage (`rollout`), never under
        # neither, which would end its rollout unrecorded.
        self.client.set_registered_model_tag(self.model_name, ROLLOUT_SHARE, repr(float(share)) if stage == CANARY else "0")
        self.client.set_registered_model_tag(self.model_name, ROLLOUT_STAGE_STARTED_AT, at)
        self.client.set_registered_model_alias(self.model_name, stage, version)
        other = CANARY if stage == SHADOW else SHADOW
        if other in self.client.get_registered_model(self.model_name).aliases:
            self.client.delete_registered_model_alias(self.model_name, other)

    def _clear_stage(self) -> None:
        model = self.client.get_registered_model(self.model_name)
        for stage in (SHADOW, CANARY):
            if stage in model.aliases:
                self.client.delete_registered_model_alias(self.model_name, stage)
        self.client.set_registered_model_tag(self.model_name, ROLLOUT_SHARE, "0")
        if ROLLOUT_STAGE_STARTED_AT in model.tags:
            self.client.delete_registered_model_tag(self.model_name, ROLLOUT_STAGE_STARTED_AT)

    def annotate(self, version: str, tags: Mapping[str, object]) -> None:
        """Set tags on a registered version (values as text)."""
        self._tag(str(version), {key: str(value) for key, value in tags.items()})

    def load_model(self, version: str) -> Pipeline:
        """The scikit-learn pipeline of a registered version."""
        location = "its artifact location"
        try:
            # The version's own artifact URI, so loading does not depend on the process-global registry URI.
            location = self.client.get_model_version_download_uri(self.model_name, str(version))
            # A tracking server's artifacts (mlflow-artifacts:/…) are fetched from the server the global URI names.
            with _global_tracking_uri(self.tracking_uri):
                return mlflow.sklearn.load_model(location)
        except Exception as error:
            raise ModelLoadError(
                f"version {version} of model '{self.model_name}' cannot be loaded from {location}: "
                f"{type(error).__name__}: {error}. Its artifacts are missing or corrupt; promote or roll back to "
                "another version"
            ) from error

    def promote(self, version: str, *, reason: str, when: datetime | None = None) -> str | None:
        """Point `production` at `version` and record why on it and on the version it replaces; that version, if any."""
        reason, at = _reason(reason), _timestamp(when)
        target = self.version(version)
        current = self.production()
        promoted = str(target.version)
        replaced = str(current.version) if current is not None else None
        if replaced == promoted:
            raise RegistryError(f"version {promoted} of model '{self.model_name}' is already in production")
        # The new version carries `previous_production` before the alias reaches it: rollback reads that tag from
        # whichever version holds the alias.
        self._tag(promoted, {PROMOTED_AT: at, PROMOTION_REASON: reason, PREVIOUS_PRODUCTION: replaced or ""})
        self.client.set_registered_model_alias(self.model_name, PRODUCTION, promoted)
        if replaced is not None:
            self._tag(replaced, {REPLACED_AT: at, REPLACED_BY: promoted, REPLACED_REASON: reason})
        return replaced

    def rollback(self, *, reason: str, when: datetime | None = None) -> tuple[str, str]:
        """Undo the promotion of the production version: `production` goes back to the version it replaced.

        A second rollback undoes the promotion before that, and so on; it refuses once production is the first model
        ever promoted. Rollbacks never rewrite `previous_production`, so they cannot bounce back to a withdrawn model.
        Returns (withdrawn version, restored version).
        """
        reason, at = _reason(reason), _timestamp(when)
        current = self.production()
        if current is None:
            raise RegistryError(f"model '{self.model_name}' has no '{PRODUCTION}' alias; there is nothing to roll back")
        previous = current.tags.get(PREVIOUS_PRODUCTION, "")
        if not previous:
            raise RegistryError(
                f"production version {current.version} of model '{self.model_name}' did not replace an earlier "
                "version; there is nothing to roll back to (promote another version instead)"
            )
        withdrawn, restored = str(current.version), str(self.version(previous).version)
        self.client.set_registered_model_alias(self.model_name, PRODUCTION, restored)
        # A candidate alias left on the withdrawn version (its rollout's end cut short) would make it a candidate again.
        aliases = self.client.get_registered_model(self.model_name).aliases
        for stage in (SHADOW, CANARY):
            if str(aliases.get(stage)) in (withdrawn, restored):
                self.client.delete_registered_model_alias(self.model_name, stage)
        self._tag(withdrawn, {ROLLED_BACK_AT: at, ROLLED_BACK_TO: restored, ROLLED_BACK_REASON: reason})
        self._tag(restored, {RESTORED_AT: at, RESTORED_FROM: withdrawn, RESTORED_REASON: reason})
        return withdrawn, restored

    def run_link(self, run_id: str) -> RunLink:
        """The run's ids, for a link to its page in the MLflow UI."""
        return RunLink(run_id=run_id, experiment_id=self.client.get_run(run_id).info.experiment_id)

    def run_url(self, run_id: str) -> str:
        """The run's page in the MLflow UI at `ui_url`."""
        return f"{self.ui_url}/{self.run_link(run_id).ui_path}"

    def version_url(self, version: str) -> str:
        """A registered version's page in the MLflow UI at `ui_url`."""
        return f"{self.ui_url}/#/models/{quote(self.model_name, safe='')}/versions/{version}"

    def _tag(self, version: str, tags: Mapping[str, str]) -> None:
        for key, value in tags.items():
            self.client.set_model_version_tag(self.model_name, version, key, value)
