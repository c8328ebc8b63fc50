"""Resources: the warehouse and the landing folder, configured once in definitions.py."""

from __future__ import annotations

from pathlib import Path

import dagster as dg

from readmission_platform.lib.warehouse import Warehouse, open_warehouse


class WarehouseResource(dg.ConfigurableResource):
    """The warehouse holding raw_batches, rejected_rows, clean_batches and features."""

    url: str

    def open(self) -> Warehouse:
        return open_warehouse(self.url)


class LandingResource(dg.ConfigurableResource):
    """The folder where upstream systems drop batch files."""

    folder: str

    @property
    def path(self) -> Path:
        return Path(self.folder)
