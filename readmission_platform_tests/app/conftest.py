"""A real `bentoml serve` with a bearer token on a platform home holding a promoted model, for the app's tests."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from readmission_platform.lib.training import HIST_GRADIENT_BOOSTING
from readmission_platform.serving.server import running_server
from readmission_platform.settings import Settings
from readmission_platform_tests.serving.conftest import new_home, register, registry_of  # noqa: F401 (a fixture)

TOKEN = "app-token"


@dataclass(frozen=True)
class Service:
    url: str
    settings: Settings
    version: str


@pytest.fixture(scope="session")
def app_service(tmp_path_factory, new_home, sample_candidates, sample_parts) -> Iterator[Service]:
    """`bentoml serve .` with READMISSION_API_TOKEN set, serving a promoted gradient-boosting candidate (the run's
    shared one: the app's tests are about the app, not the model)."""
    settings = new_home(tmp_path_factory.mktemp("app-home"))
    version = register(registry_of(settings), sample_candidates[HIST_GRADIENT_BOOSTING], sample_parts, promote=True)
    with running_server(settings, bento=None, env={"READMISSION_API_TOKEN": TOKEN}) as url:
        yield Service(url, settings, version)


@pytest.fixture
def app_env(monkeypatch, app_service: Service) -> Service:
    """The environment the app reads: the service's address and token, the platform's home."""
    monkeypatch.setenv("READMISSION_SERVICE_URL", app_service.url)
    monkeypatch.setenv("READMISSION_API_TOKEN", TOKEN)
    monkeypatch.setenv("READMISSION_HOME", str(app_service.settings.home))
    for name in ("READMISSION_WAREHOUSE_URL", "READMISSION_PREDICTION_LOG_URL"):
        monkeypatch.delenv(name, raising=False)
    return app_service
