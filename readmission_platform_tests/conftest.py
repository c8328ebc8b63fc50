"""Fixtures shared by every test layer: the real data set (whole and a small sample) and a scratch PostgreSQL database."""

from __future__ import annotations

import os

# scikit-learn's gradient boosting runs one OpenMP thread per core, and OpenMP threads spin while they wait for each
# other: with several pytest-xdist workers (and their servers) on two cores, a fit took many times as long as on one
# thread (benchmarks/README.md, Tests). Set before any library that loads OpenMP is imported; inherited by children.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pickle  # noqa: E402
import secrets  # noqa: E402
import shutil  # noqa: E402
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import urlsplit

import polars as pl  # noqa: E402
import pytest  # noqa: E402
from filelock import FileLock  # noqa: E402

from readmission_platform.lib import schema
from readmission_platform.lib.cleaning import CleanResult, clean
from readmission_platform.lib.ingest import parse_batch
from readmission_platform.lib.landing import split_batches
from readmission_platform.lib.reporting import masked
from readmission_platform.lib.source import read_source_bytes

SAMPLE_ROWS = 3_000
SAMPLE_BATCH = 1_000
DEFAULT_PG_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
NOTHING_LOADED = pl.DataFrame(schema={"encounter_id": pl.Int64, schema.BATCH_ID: pl.String})
INGESTED_AT = datetime(2024, 1, 1, tzinfo=UTC)


@pytest.fixture(scope="session")
def full_source_bytes() -> bytes:
    """The bundled data set's CSV, checksum-verified: 101,766 encounters."""
    return read_source_bytes()


@pytest.fixture(scope="session")
def sample_source_bytes(full_source_bytes: bytes) -> bytes:
    """The real header and the first 3,000 data lines, byte for byte (CRLF endings kept)."""
    return b"".join(full_source_bytes.splitlines(keepends=True)[: SAMPLE_ROWS + 1])


@pytest.fixture(scope="session")
def sample_batches(sample_source_bytes: bytes) -> list[bytes]:
    """Three batch files of 1,000 real encounters each, the original text kept."""
    return split_batches(sample_source_bytes, SAMPLE_BATCH)


@pytest.fixture(scope="session")
def full_raw(full_source_bytes: bytes) -> pl.DataFrame:
    """The whole data set parsed as one batch 'full' (schema.RAW_SCHEMA); do not mutate."""
    parsed = parse_batch(
        full_source_bytes,
        batch_id="full",
        source_file="diabetic_data.csv",
        loaded_elsewhere=NOTHING_LOADED,
        now=INGESTED_AT,
    )
    assert parsed.rejected.is_empty(), parsed.rejected.head()
    return parsed.rows


@pytest.fixture(scope="session")
def full_clean(full_raw: pl.DataFrame) -> CleanResult:
    """`clean` of the whole data set: `.frame` (schema.CLEAN_SCHEMA) and `.dropped` counts; do not mutate."""
    return clean(full_raw)


def _with_database(url: str, database: str) -> str:
    return urlsplit(url)._replace(path=f"/{database}").geturl()


@pytest.fixture(scope="session")
def postgres_url():
    """URL of a fresh database on the server at READMISSION_TEST_PG_URL, dropped at the end of the session.

    An unreachable server fails the tests that need it; READMISSION_SKIP_POSTGRES=1 skips them instead.
    """
    if os.environ.get("READMISSION_SKIP_POSTGRES") == "1":
        pytest.skip("READMISSION_SKIP_POSTGRES=1: tests that need PostgreSQL are skipped")
    import psycopg
    from psycopg import sql

    admin_url = os.environ.get("READMISSION_TEST_PG_URL") or DEFAULT_PG_URL
    database = f"readmission_test_{secrets.token_hex(6)}"
    try:
        with psycopg.connect(admin_url, autocommit=True, connect_timeout=5) as connection:
            connection.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(database)))
        problem = None
    except psycopg.Error as error:
        problem = str(error).strip()
    if problem:
        pytest.fail(
            f"cannot create a test database on the PostgreSQL server at {masked(admin_url)}: {problem}\n"
            "Start PostgreSQL there, point READMISSION_TEST_PG_URL at a server where this user may create "
            "databases, or set READMISSION_SKIP_POSTGRES=1 to skip the PostgreSQL tests.",
            pytrace=False,
        )
    yield _with_database(admin_url, database)
    with psycopg.connect(admin_url, autocommit=True, connect_timeout=5) as connection:
        connection.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(database)))


@pytest.fixture
def pg_schema_url(postgres_url: str):
    """URL of a fresh schema in the session's database, selected through libpq's search_path option."""
    import psycopg

    name = f"t_{secrets.token_hex(6)}"
    with psycopg.connect(postgres_url, autocommit=True) as connection:
        connection.execute(f"CREATE SCHEMA {name}")
    parts = urlsplit(postgres_url)
    query = "&".join(filter(None, [parts.query, f"options=-csearch_path%3D{name}"]))
    yield parts._replace(query=query).geturl()
    with psycopg.connect(postgres_url, autocommit=True) as connection:
        connection.execute(f"DROP SCHEMA {name} CASCADE")


@pytest.fixture(scope="session")
def new_pg_database(postgres_url: str):
    """Make fresh databases on the test server (for stores such as MLflow's that want one to themselves)."""
    import psycopg
    from psycopg import sql

    made = []

    def make(prefix: str) -> str:
        name = f"{prefix}_{secrets.token_hex(6)}"
        with psycopg.connect(postgres_url, autocommit=True) as connection:
            connection.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        made.append(name)
        return _with_database(postgres_url, name)

    yield make
    with psycopg.connect(postgres_url, autocommit=True) as connection:
        for name in made:
            connection.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


@pytest.fixture(scope="session")
def new_mlflow_store(tmp_path_factory):
    """Put an empty MLflow SQLite store at a path, a copy of one made once; returns its tracking URI.

    MLflow takes seconds to create a store's tables. What the platform does on a store's first use is tested where it
    is the point (lib/test_registry.py, the demo).
    """
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    template = tmp_path_factory.mktemp("mlflow-template") / "mlflow.db"
    SqlAlchemyStore(f"sqlite:///{template}", (template.parent / "artifacts").as_uri())

    def make(path: Path) -> str:
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(template, path)
        path.chmod(0o600)  # as the platform's umask makes it
        return f"sqlite:///{path}"

    return make


@pytest.fixture(scope="session")
def full_features(once_per_run, request) -> pl.DataFrame:
    """`build_features` of the whole clean data set with each encounter's history, and its patient-grouped `split`, as
    the training set holds them (made once per run); do not mutate."""
    from readmission_platform.lib.features import build_features
    from readmission_platform.lib.history import with_history
    from readmission_platform.lib.splitting import assign_split

    def build() -> pl.DataFrame:
        raw, cleaned = request.getfixturevalue("full_raw"), request.getfixturevalue("full_clean")
        return assign_split(with_history(build_features(cleaned.frame), raw))

    return once_per_run("full_features", build)


@pytest.fixture(scope="session")
def sample_parts(full_features: pl.DataFrame) -> dict[str, pl.DataFrame]:
    """The first 20,000 encounters, split by patient: about 14,000 / 3,000 / 3,000 rows."""
    from readmission_platform.lib.splitting import SPLIT

    head = full_features.head(20_000)
    return {name: head.filter(pl.col(SPLIT) == name) for name in ("train", "validation", "test")}


@pytest.fixture(scope="session")
def once_per_run(tmp_path_factory, worker_id):
    """`once(name, make)`: `make()` run by the first pytest-xdist worker that asks, pickled where the others load it.

    Session fixtures are per worker; this keeps what is costly to make (trained models) to one making per run.
    """
    if worker_id == "master":
        return lambda name, make: make()
    shared = tmp_path_factory.getbasetemp().parent  # the run's folder, above every worker's own

    def once(name: str, make):
        path = shared / f"{name}.pickle"
        with FileLock(f"{path}.lock"):
            if path.is_file():
                return pickle.loads(path.read_bytes())
            made = make()
            path.write_bytes(pickle.dumps(made))
            return made

    return once


@pytest.fixture(scope="session")
def sample_candidates(once_per_run, sample_parts: dict[str, pl.DataFrame]) -> dict:
    """One calibrated candidate of each known model family trained on `sample_parts`, by family (made once per run)."""
    from readmission_platform.lib.training import KNOWN_FAMILIES, train_candidates

    def train() -> dict:
        trained = train_candidates(sample_parts["train"], sample_parts["validation"], families=KNOWN_FAMILIES, search_seconds=float("inf"))
        return {c.family: c for c in trained}

    return once_per_run("sample_candidates", train)
