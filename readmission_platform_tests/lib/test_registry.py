"""ModelRegistry against real MLflow stores: a SQLite file and a PostgreSQL database of this module's own.

One store per backend is shared by the whole module (MLflow's migrations take seconds); every test registers its own
model name, so aliases and versions of one test never meet another's.
"""

import secrets
import shutil
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace

import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow.models import Model
from mlflow.utils.file_utils import local_file_uri_to_path
from sklearn.calibration import CalibratedClassifierCV
from sklearn.compose import ColumnTransformer
from sklearn.ensemble import HistGradientBoostingClassifier
from sklearn.frozen import FrozenEstimator
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import OneHotEncoder, OrdinalEncoder, StandardScaler

from readmission_platform.lib.registry import (
    CANARY,
    PRODUCTION,
    ROLLOUT_END_REASON,
    ROLLOUT_REASON,
    ROLLOUT_SHARE,
    ROLLOUT_STAGE_STARTED_AT,
    SHADOW,
    ModelLoadError,
    ModelRegistry,
    RegistryError,
    Rollout,
    RolloutMoved,
    decision_threshold,
    mlflow_store_uris,
)

WHEN = datetime(2024, 3, 1, 12, 0, tzinfo=UTC)
LATER = datetime(2024, 3, 2, 9, 30, tzinfo=UTC)


@pytest.fixture(scope="module")
def frame() -> pd.DataFrame:
    """300 rows of two numeric columns and one categorical column, with a label that depends on them."""
    rng = np.random.default_rng(0)
    rows = 300
    features = pd.DataFrame(
        {
            "days": rng.normal(4, 2, rows),
            "visits": rng.poisson(1, rows).astype(float),
            "ward": rng.choice(["cardiology", "surgery", "internal"], rows),
        }
    )
    signal = 0.5 * features["days"] + features["visits"] + (features["ward"] == "surgery") + rng.normal(0, 1, rows)
    return features.assign(label=(signal > signal.median()).astype(int))


@pytest.fixture(scope="module")
def models(frame) -> list[Pipeline]:
    """Two fitted pipelines that predict differently."""
    fitted = []
    for c in (1.0, 0.001):
        preprocess = ColumnTransformer(
            [
                ("categorical", OneHotEncoder(handle_unknown="ignore"), ["ward"]),
                ("numeric", StandardScaler(), ["days", "visits"]),
            ]
        )
        pipeline = Pipeline([("preprocess", preprocess), ("classifier", LogisticRegression(C=c))])
        fitted.append(pipeline.fit(frame.drop(columns="label"), frame["label"]))
    return fitted


@pytest.fixture(scope="module", params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def store(request, tmp_path_factory) -> tuple[str, str]:
    """(tracking URI, artifact root) of a store shared by this module: SQLite, or a PostgreSQL database of its own."""
    home = tmp_path_factory.mktemp(request.param)
    if request.param == "sqlite":
        yield mlflow_store_uris(home)
        return
    yield request.getfixturevalue("new_pg_database")("mlflow_test"), (home / "artifacts").as_uri()


@pytest.fixture
def registry(store) -> ModelRegistry:
    """A registry on the shared store with a registered-model name of its own."""
    return ModelRegistry(*store, model_name=f"readmission-classifier-{secrets.token_hex(4)}")


def log(registry: ModelRegistry, model: Pipeline, frame: pd.DataFrame, **overrides) -> str:
    arguments = {
        "params": {"seed": 0},
        "metrics": {"validation_roc_auc": 0.7},
        "tags": {"family": "logistic_regression"},
        "artifacts": None,
        "input_example": frame.drop(columns="label"),
        "run_name": "logistic_regression",
    }
    return registry.log_candidate(model, **(arguments | overrides))


def registered(registry: ModelRegistry, model: Pipeline, frame: pd.DataFrame, threshold: float = 0.5) -> str:
    return registry.register(log(registry, model, frame), threshold=threshold, tags={})


def fresh_alias(registry: ModelRegistry) -> str:
    """The production version as a new client reads it from the store."""
    client = mlflow.MlflowClient(registry.tracking_uri, registry_uri=registry.tracking_uri)
    return str(client.get_model_version_by_alias(registry.model_name, PRODUCTION).version)


def artifact_folder(registry: ModelRegistry, version: str) -> Path:
    return Path(local_file_uri_to_path(registry.client.get_model_version_download_uri(registry.model_name, version)))


def test_store_uris_live_under_home(tmp_path):
    tracking, artifacts = mlflow_store_uris(tmp_path)

    assert tracking == f"sqlite:///{tmp_path}/mlflow/mlflow.db"
    assert artifacts == f"file://{tmp_path}/mlflow/artifacts"
    assert (tmp_path / "mlflow").is_dir()


def test_candidate_run_holds_params_metrics_tags_files_and_model(registry, models, frame, tmp_path):
    (tmp_path / "calibration.png").write_bytes(b"\x89PNG not really")
    (tmp_path / "report.csv").write_text("group,roc_auc\nF,0.7\n")

    run_id = log(
        registry,
        models[0],
        frame,
        params={"C": 1.0},
        metrics={"test_roc_auc": 0.71, "test_brier": 0.2},
        tags={"batches": "b1,b2", "rows": 300},
        artifacts={"plots/calibration.png": tmp_path / "calibration.png", "subgroups": tmp_path / "report.csv"},
    )

    run = mlflow.MlflowClient(registry.tracking_uri).get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.info.run_name == "logistic_regression"
    assert run.data.params == {"C": "1.0"}
    assert run.data.metrics == {"test_roc_auc": 0.71, "test_brier": 0.2}
    assert {"batches": "b1,b2", "rows": "300"}.items() <= run.data.tags.items()
    files = Path(local_file_uri_to_path(run.info.artifact_uri))
    assert (files / "plots" / "calibration.png").read_bytes() == b"\x89PNG not really"
    assert (files / "subgroups.csv").read_text() == "group,roc_auc\nF,0.7\n"
    assert registry.run_link(run_id).ui_path == f"#/experiments/{run.info.experiment_id}/runs/{run_id}"
    assert registry.run_url(run_id) == f"http://127.0.0.1:5000/#/experiments/{run.info.experiment_id}/runs/{run_id}"


def test_registered_version_carries_threshold_tags_and_signature(registry, store, models, frame):
    run_id = log(registry, models[0], frame)

    first = registry.register(run_id, threshold=0.3125, tags={"batches": "b1,b2", "dagster_run_id": "abc"})
    second = registered(registry, models[1], frame)

    version = registry.version(first)
    assert (first, second) == ("1", "2")
    assert decision_threshold(version) == 0.3125
    assert version.tags == {"threshold": "0.3125", "batches": "b1,b2", "dagster_run_id": "abc"}
    assert version.run_id == run_id
    assert "0.3125" in version.description
    assert [str(v.version) for v in registry.versions()] == ["2", "1"]
    elsewhere = ModelRegistry(*store, model_name="readmission classifier", ui_url="http://mlflow:8080/")
    assert elsewhere.version_url("2") == "http://mlflow:8080/#/models/readmission%20classifier/versions/2"
    assert registry.production() is None
    logged = Model.load(artifact_folder(registry, first))
    assert logged.signature.inputs.input_names() == ["days", "visits", "ward"]
    assert logged.signature.outputs.to_dict() == [
        {"type": "tensor", "tensor-spec": {"dtype": "float64", "shape": (-1, 2)}}
    ]


def test_load_model_gives_the_same_probabilities(registry, models, frame):
    version = registered(registry, models[0], frame)

    loaded = registry.load_model(version)

    features = frame.drop(columns="label")
    assert isinstance(loaded, Pipeline)
    assert np.array_equal(loaded.predict_proba(features), models[0].predict_proba(features))


def test_calibrated_tree_pipeline_round_trips(registry, frame):
    """Calibration and tree internals are types skops does not trust by default; training.py's models hold them."""
    features, labels = frame.drop(columns="label"), frame["label"]
    preprocess = ColumnTransformer(
        [("categorical", OrdinalEncoder(), ["ward"]), ("numeric", "passthrough", ["days", "visits"])]
    ).fit(features)
    encoded = preprocess.transform(features)
    trees = HistGradientBoostingClassifier(max_iter=20, categorical_features=[0]).fit(encoded, labels)
    calibrated = CalibratedClassifierCV(FrozenEstimator(trees), method="sigmoid").fit(encoded, labels)
    model = Pipeline([("preprocess", preprocess), ("classifier", calibrated)])

    version = registry.register(log(registry, model, frame), threshold=0.5, tags={})

    assert np.array_equal(registry.load_model(version).predict_proba(features), model.predict_proba(features))


def test_promote_moves_the_alias_and_tags_both_versions(registry, models, frame):
    first, second = (registered(registry, model, frame) for model in models)

    assert registry.promote(first, reason="first model", when=WHEN) is None
    assert fresh_alias(registry) == first
    assert registry.promote(second, reason="test ROC-AUC 0.70 beats 0.68", when=LATER) == first

    assert fresh_alias(registry) == second
    assert str(registry.production().version) == second
    assert registry.version(first).tags == {
        "threshold": "0.5",
        "promoted_at": WHEN.isoformat(),
        "promotion_reason": "first model",
        "previous_production": "",
        "replaced_at": LATER.isoformat(),
        "replaced_by": second,
        "replaced_reason": "test ROC-AUC 0.70 beats 0.68",
    }
    assert registry.version(second).tags == {
        "threshold": "0.5",
        "promoted_at": LATER.isoformat(),
        "promotion_reason": "test ROC-AUC 0.70 beats 0.68",
        "previous_production": first,
    }


def test_promoting_the_production_version_again_is_refused(registry, models, frame):
    version = registered(registry, models[0], frame)
    registry.promote(version, reason="first model")

    with pytest.raises(RegistryError, match=f"version {version} of model '.*' is already in production"):
        registry.promote(version, reason="again")
    assert registry.version(version).tags["previous_production"] == ""


def test_rollback_restores_the_replaced_version_and_walks_back_one_promotion_at_a_time(registry, models, frame):
    one, two, three = (registered(registry, model, frame) for model in (*models, models[0]))
    for version in (one, two, three):
        registry.promote(version, reason=f"promote {version}", when=WHEN)

    assert registry.rollback(reason="calibration drifted", when=LATER) == (three, two)

    assert fresh_alias(registry) == two
    assert {k: v for k, v in registry.version(three).tags.items() if k.startswith("rolled_back")} == {
        "rolled_back_at": LATER.isoformat(),
        "rolled_back_to": two,
        "rolled_back_reason": "calibration drifted",
    }
    assert {k: v for k, v in registry.version(two).tags.items() if k.startswith("restored")} == {
        "restored_at": LATER.isoformat(),
        "restored_from": three,
        "restored_reason": "calibration drifted",
    }
    assert registry.rollback(reason="still wrong") == (two, one)
    assert fresh_alias(registry) == one
    with pytest.raises(RegistryError, match=f"production version {one} .* did not replace an earlier version"):
        registry.rollback(reason="once more")
    assert fresh_alias(registry) == one


def test_rollback_without_production_is_refused(registry, models, frame):
    with pytest.raises(RegistryError, match="has no 'production' alias; there is nothing to roll back"):
        registry.rollback(reason="no model yet")

    registered(registry, models[0], frame)
    with pytest.raises(RegistryError, match="has no 'production' alias"):
        registry.rollback(reason="registered but never promoted")


def test_rollback_needs_a_reason(registry):
    with pytest.raises(ValueError, match="the reason is empty"):
        registry.rollback(reason="  ")


def test_version_with_missing_or_corrupt_artifacts_raises_model_load_error(registry, models, frame):
    deleted, corrupt = (registered(registry, model, frame) for model in models)
    shutil.rmtree(artifact_folder(registry, deleted))
    (artifact_folder(registry, corrupt) / "model.skops").write_bytes(b"not a skops archive")

    with pytest.raises(ModelLoadError, match=f"version {deleted} of model '{registry.model_name}' cannot be loaded"):
        registry.load_model(deleted)
    with pytest.raises(ModelLoadError, match=f"version {corrupt} of model '{registry.model_name}' cannot be loaded"):
        registry.load_model(corrupt)


def test_unknown_version_is_named_with_the_known_ones(registry, models, frame):
    registered(registry, models[0], frame)

    with pytest.raises(RegistryError, match="has no version 7; registered versions: 1"):
        registry.version("7")


def test_log_candidate_leaves_the_global_tracking_uri_as_it_was(registry, models, frame, tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    elsewhere = f"sqlite:///{tmp_path}/elsewhere.db"
    mlflow.set_tracking_uri(elsewhere)
    try:
        log(registry, models[0], frame)
        assert mlflow.get_tracking_uri() == elsewhere
    finally:
        mlflow.set_tracking_uri(None)
    assert not (tmp_path / "elsewhere.db").exists()


def test_no_call_falls_back_to_the_default_store(registry, models, frame, tmp_path, monkeypatch):
    """MLflow's default store is ./mlflow.db: a call that used it instead of the registry's would create that file."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert not mlflow.is_tracking_uri_set()

    first, second = (registered(registry, model, frame) for model in models)
    registry.promote(first, reason="first model")
    registry.promote(second, reason="better")
    registry.rollback(reason="worse in practice")
    registry.load_model(first)

    assert not mlflow.is_tracking_uri_set()
    assert list(tmp_path.iterdir()) == []


def test_missing_artifact_file_is_named_before_a_run_starts(registry, models, frame, tmp_path):
    runs_before = len(registry.client.search_runs([registry.experiment_id]))

    with pytest.raises(FileNotFoundError, match="artifact 'plots/roc.png' should be the file"):
        log(registry, models[0], frame, artifacts={"plots/roc.png": tmp_path / "roc.png"})
    with pytest.raises(ValueError, match="must be a relative path inside the run"):
        log(registry, models[0], frame, artifacts={"../roc.png": tmp_path / "roc.png"})
    (tmp_path / "roc.png").write_bytes(b"png")
    with pytest.raises(ValueError, match="two artifacts would both be stored as 'roc.png'"):
        log(registry, models[0], frame, artifacts={"roc": tmp_path / "roc.png", "roc.png": tmp_path / "roc.png"})
    assert len(registry.client.search_runs([registry.experiment_id])) == runs_before


def test_a_candidate_that_fails_midway_leaves_a_failed_run(registry, models, frame):
    with pytest.raises(ValueError, match="could not convert string to float"):
        log(registry, models[0], frame, metrics={"roc_auc": "n/a"}, run_name="broken")

    [run] = registry.client.search_runs([registry.experiment_id], "attributes.run_name = 'broken'")
    assert run.info.status == "FAILED"


def test_register_refuses_a_run_without_a_model(registry):
    run_id = registry.client.create_run(registry.experiment_id).info.run_id

    with pytest.raises(RegistryError, match=f"run {run_id} logged 0 models; expected exactly one"):
        registry.register(run_id, threshold=0.5, tags={})


def test_threshold_must_be_a_probability(registry):
    with pytest.raises(ValueError, match="threshold 1.5 is not a probability"):
        registry.register("any", threshold=1.5, tags={})


def _open_registry(tracking_uri: str, start, outcomes) -> None:
    start.wait()
    try:
        ModelRegistry(tracking_uri, None)
        outcomes.put("opened")
    except Exception as error:  # the outcome to compare, not a failure of this helper
        outcomes.put(f"{type(error).__name__}: {error}"[:300])


def test_processes_opening_a_new_sqlite_store_at_once_all_open_it(tmp_path):
    # A run's steps, a sensor's runs and serving workers may be the first to open the store at the same moment.
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    start, outcomes = context.Barrier(3), context.Queue()
    uri = f"sqlite:///{tmp_path / 'new' / 'mlflow.db'}"
    openers = [context.Process(target=_open_registry, args=(uri, start, outcomes)) for _ in range(3)]
    for opener in openers:
        opener.start()
    found = [outcomes.get(timeout=180) for _ in openers]
    for opener in openers:
        opener.join()
    assert found == ["opened"] * 3


def fresh_model(registry: ModelRegistry):
    """The registered model (aliases as text, tags) as a new client reads it from the store."""
    model = mlflow.MlflowClient(registry.tracking_uri, registry_uri=registry.tracking_uri).get_registered_model(registry.model_name)
    return SimpleNamespace(aliases={k: str(v) for k, v in model.aliases.items()}, tags=model.tags)


def test_a_candidate_goes_shadow_then_canary_steps_then_production(registry, models, frame):
    one, two = (registered(registry, model, frame) for model in models)
    registry.promote(one, reason="first model", when=WHEN)
    assert registry.rollout() is None

    assert registry.start_shadow(two, reason="better with 95 % confidence", when=WHEN) is None
    shadow = fresh_model(registry)
    assert shadow.aliases == {PRODUCTION: one, SHADOW: two}
    assert shadow.tags[ROLLOUT_SHARE] == "0" and shadow.tags[ROLLOUT_STAGE_STARTED_AT] == WHEN.isoformat()
    assert registry.rollout() == Rollout(two, SHADOW, 0.0, WHEN)
    assert registry.version(two).tags[ROLLOUT_REASON] == "better with 95 % confidence"

    registry.set_canary(0.1, when=LATER)
    canary = fresh_model(registry)
    assert canary.aliases == {PRODUCTION: one, CANARY: two}
    assert float(canary.tags[ROLLOUT_SHARE]) == 0.1 and canary.tags[ROLLOUT_STAGE_STARTED_AT] == LATER.isoformat()
    assert registry.set_canary(0.25) == registry.rollout() and registry.rollout().share == 0.25

    assert registry.finish_rollout(reason="healthy at every step") == one
    done = fresh_model(registry)
    assert done.aliases == {PRODUCTION: two} and done.tags[ROLLOUT_SHARE] == "0"
    assert ROLLOUT_STAGE_STARTED_AT not in done.tags and registry.rollout() is None
    assert registry.version(two).tags["previous_production"] == one
    assert registry.rollback(reason="undo") == (two, one)  # a finished rollout is a promotion like any other


def test_ending_a_rollout_leaves_production_alone_and_tags_the_candidate(registry, models, frame):
    one, two = (registered(registry, model, frame) for model in models)
    registry.promote(one, reason="first model")
    registry.start_shadow(two, reason="better")
    registry.set_canary(0.5)

    assert registry.end_rollout(reason="raised ValueError on 4 % of requests", when=LATER) == two
    assert fresh_model(registry).aliases == {PRODUCTION: one} and fresh_model(registry).tags[ROLLOUT_SHARE] == "0"
    assert registry.version(two).tags[ROLLOUT_END_REASON] == "raised ValueError on 4 % of requests"
    with pytest.raises(RegistryError, match="no 'shadow' or 'canary' alias; no rollout is under way"):
        registry.end_rollout(reason="again")
    with pytest.raises(RegistryError, match="no rollout is under way"):
        registry.set_canary(0.1)


def test_a_newer_challenger_replaces_the_candidate_and_production_cannot_be_one(registry, models, frame):
    one, two, three = (registered(registry, model, frame) for model in (*models, models[0]))
    registry.promote(one, reason="first model")
    with pytest.raises(RegistryError, match=f"version {one} .* is in production; it cannot be a candidate"):
        registry.start_shadow(one, reason="again")
    registry.start_shadow(two, reason="better")
    registry.set_canary(0.25)

    assert registry.start_shadow(three, reason="better still") == two
    assert fresh_model(registry).aliases == {PRODUCTION: one, SHADOW: three}
    assert registry.version(two).tags[ROLLOUT_END_REASON] == f"replaced by v{three}: better still"
    assert registry.start_shadow(three, reason="retry of the same decision") is None  # idempotent


def test_a_step_judged_on_one_candidate_is_not_carried_out_on_another(registry, models, frame):
    one, two, three = (registered(registry, model, frame) for model in (*models, models[0]))
    registry.promote(one, reason="first model")
    registry.start_shadow(two, reason="better")
    registry.start_shadow(three, reason="better still")  # while two was being judged

    for step in (lambda: registry.set_canary(0.5, version=two), lambda: registry.finish_rollout(reason="healthy", version=two),
                 lambda: registry.end_rollout(reason="failing", version=two)):  # fmt: skip
        with pytest.raises(RolloutMoved, match=f"now of v{three}, not of v{two}"):
            step()
    assert fresh_model(registry).aliases == {PRODUCTION: one, SHADOW: three}
    registry.end_rollout(reason="failing", version=three)
    with pytest.raises(RolloutMoved, match=f"v{three}'s rollout is no longer under way"):
        registry.set_canary(0.5, version=three)


def test_a_rollout_step_cut_short_leaves_no_candidate_that_should_not_be_one(registry, models, frame):
    one, two = (registered(registry, model, frame) for model in models)
    registry.promote(one, reason="first model")
    registry.start_shadow(two, reason="better")
    # Killed within `_set_stage` between setting canary and removing shadow: the later stage is the candidate's.
    registry.client.set_registered_model_alias(registry.model_name, CANARY, two)
    assert registry.rollout().stage == CANARY and registry.rollout().version == two
    registry.set_canary(0.5, version=two)
    assert fresh_model(registry).aliases == {PRODUCTION: one, CANARY: two}

    # Killed within `finish_rollout` after the promotion, before the stage was cleared: the rollout is over.
    registry.promote(two, reason="healthy at every step")
    assert fresh_model(registry).aliases == {PRODUCTION: two, CANARY: two} and registry.rollout() is None
    # A rollback then must not make the withdrawn version a canary again.
    assert registry.rollback(reason="worse live") == (two, one)
    assert fresh_model(registry).aliases == {PRODUCTION: one} and registry.rollout() is None


@pytest.mark.parametrize("share", [0.0, -0.1, 1.5, float("nan")])
def test_a_canary_share_outside_zero_to_one_is_refused(registry, share):
    with pytest.raises(ValueError, match=r"expected a number in \(0, 1\]"):
        registry.set_canary(share)
