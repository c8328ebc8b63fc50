"""Every command opens the registry as the platform does: with the home's artifact folder for a store on a database,
and none for a tracking server, which stores artifacts itself."""

from __future__ import annotations

import pytest

from readmission_platform.settings import Settings


class Opened(Exception):
    """Raised by the stand-in registry once it has been opened: what the command passed is all the test needs."""


@pytest.fixture
def opened(monkeypatch) -> list[tuple]:
    import readmission_platform.lib.registry as registry

    calls: list[tuple] = []

    def stand_in(tracking_uri, artifact_root, *args, **kwargs):
        calls.append((tracking_uri, artifact_root))
        raise Opened

    monkeypatch.setattr(registry, "ModelRegistry", stand_in)
    return calls


@pytest.mark.parametrize("tracking_uri", ["http://127.0.0.1:5000", None])
def test_rollout_and_the_demo_open_the_registry_with_the_platforms_artifact_location(tmp_path, opened, tracking_uri):
    from readmission_platform.cli.demo import production_version
    from readmission_platform.cli.rollout import rollout

    env = {"READMISSION_HOME": str(tmp_path)} | ({"READMISSION_MLFLOW_TRACKING_URI": tracking_uri} if tracking_uri else {})
    settings = Settings.from_env(env)

    with pytest.raises(Opened):
        rollout(settings, "status", None, print)
    with pytest.raises(Opened):
        production_version(settings)

    expected = (settings.mlflow_tracking_uri, settings.mlflow_artifact_location)
    assert opened == [expected, expected]
    assert (expected[1] is None) == (tracking_uri is not None)  # a tracking server is given no artifact folder
