"""The Dagster instance under READMISSION_HOME, configured by the repository's dagster.yaml."""

from __future__ import annotations

import os
from pathlib import Path

from readmission_platform.settings import Settings

REPO_ROOT = Path(__file__).resolve().parents[2]
INSTANCE_CONFIGS = {"sqlite": REPO_ROOT / "dagster.yaml", "postgres": REPO_ROOT / "dagster-postgres.yaml"}


def prepare_dagster_home(settings: Settings) -> Path:
    """Make READMISSION_HOME/dagster the Dagster home, its dagster.yaml a link to the repository's file.

    SQLite storage by default; with READMISSION_DAGSTER_STORAGE_URL, dagster-postgres.yaml (the same
    settings with PostgreSQL storage). Sets DAGSTER_HOME for this process and the ones it starts.
    """
    config = INSTANCE_CONFIGS["postgres" if settings.dagster_storage_url else "sqlite"]
    if not config.exists():
        raise FileNotFoundError(f"{config} is missing; run the platform from a checkout of the repository")
    home = settings.dagster_home
    home.mkdir(parents=True, exist_ok=True)
    link = home / "dagster.yaml"
    if link.is_symlink() or link.exists():
        if link.resolve() == config.resolve():
            os.environ["DAGSTER_HOME"] = str(home)
            return home
        link.unlink()
    link.symlink_to(config)
    os.environ["DAGSTER_HOME"] = str(home)
    return home
