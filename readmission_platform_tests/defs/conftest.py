"""Fixtures for the Dagster layer: a landing folder and a warehouse per test, on DuckDB and PostgreSQL."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import dagster as dg
import pytest

from readmission_platform.defs.resources import LandingResource, WarehouseResource
from readmission_platform.lib.warehouse import Warehouse, open_warehouse


@dataclass
class Platform:
    landing: Path
    warehouse_url: str

    @property
    def resources(self) -> dict:
        return {
            "landing": LandingResource(folder=str(self.landing)),
            "warehouse": WarehouseResource(url=self.warehouse_url),
        }

    @property
    def warehouse(self) -> Warehouse:
        return open_warehouse(self.warehouse_url)

    def drop(self, name: str, data: bytes) -> Path:
        path = self.landing / name
        path.write_bytes(data)
        return path


@pytest.fixture(params=["duckdb", pytest.param("postgres", marks=pytest.mark.postgres)])
def platform(request, tmp_path: Path) -> Platform:
    landing = tmp_path / "landing"
    landing.mkdir()
    if request.param == "duckdb":
        return Platform(landing, f"duckdb:///{tmp_path / 'warehouse.duckdb'}")
    return Platform(landing, request.getfixturevalue("pg_schema_url"))


@pytest.fixture
def instance():
    with dg.instance_for_test() as instance:
        yield instance
