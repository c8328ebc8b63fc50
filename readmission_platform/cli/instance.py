"""The Dagster instance under READMISSION_HOME, configured by the repository's dagster.yaml."""

from __future__ import annotations

import os
from pathlib import Path

from readmission_platform.lib.reporting import masked
from readmission_platform.settings import Settings

REPO_ROOT = Path(__file__).resolve().parents[2]
INSTANCE_CONFIGS = {"sqlite": REPO_ROOT / "dagster.yaml", "postgres": REPO_ROOT / "dagster-postgres.yaml"}


# Servers a database URL may name, reached with a connection timeout of their driver's.
SERVER_SCHEMES = ("postgresql", "postgres", "mysql")


def check_database(url: str, variable: str, timeout: int = 10) -> None:
    """Connect once to the database server at `url` (set by `variable`), so that one that is down, refuses or is
    misnamed is named in a line at once, not after a library's retries (MLflow's: ten, over about 100 s) in a traceback.
    A URL of no server (SQLite, a path, http) is left to its user."""
    if not url.startswith(SERVER_SCHEMES):
        return
    import sqlalchemy as sa

    try:
        engine = sa.create_engine(url, poolclass=sa.pool.NullPool, connect_args={"connect_timeout": timeout})
    except (sa.exc.ArgumentError, sa.exc.NoSuchModuleError, ValueError) as error:
        raise ValueError(f"{variable} is not a database URL ({masked(url)}): {error}") from None
    try:
        with engine.connect():
            pass
    except sa.exc.DBAPIError as error:
        first = next(iter(str(error.orig).strip().splitlines()), type(error.orig).__name__)
        raise RuntimeError(f"cannot connect to {masked(url)} ({variable}): {first}") from None
    finally:
        engine.dispose()


def check_dagster_storage(settings: Settings) -> None:
    """The instance's PostgreSQL storage, if set, is a PostgreSQL URL and answers (Dagster's own connection would try
    for 15 s and end in a traceback)."""
    url = settings.dagster_storage_url
    if not url:
        return
    if not url.startswith(("postgresql://", "postgres://")):
        raise ValueError(f"READMISSION_DAGSTER_STORAGE_URL is {masked(url)!r}; expected "
                         "postgresql://user:password@host:port/database (unset: SQLite in the home)")  # fmt: skip
    check_database(url, "READMISSION_DAGSTER_STORAGE_URL")


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
