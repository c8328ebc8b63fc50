"""Time raw → clean → features on the whole bundled data set: the platform into DuckDB and PostgreSQL,
against the seeds' pandas/to_sql baseline into the same PostgreSQL server, in the same run."""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import secrets
import statistics
import sys
import tempfile
import time
import warnings
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

# The warehouse imports its drivers lazily; importing them here keeps that one-time cost out of the timings.
import adbc_driver_postgresql.dbapi  # noqa: F401
import duckdb
import numpy as np
import pandas as pd
import polars as pl
import psycopg
import sqlalchemy as sa

from readmission_platform.defs.ingestion.assets import loaded_elsewhere
from readmission_platform.lib import schema
from readmission_platform.lib.cleaning import clean
from readmission_platform.lib.features import (
    CATEGORICAL_FEATURES,
    FEATURE_SCHEMA,
    LABEL_COLUMNS,
    MEDICATION_FEATURES,
    MISSING_CATEGORY,
    NUMERIC_FEATURES,
    build_features,
)
from readmission_platform.lib.ingest import parse_batch
from readmission_platform.lib.landing import batch_file_name, batch_id_for, split_batches
from readmission_platform.lib.source import read_source_bytes
from readmission_platform.lib.warehouse import open_warehouse

RESULTS = Path(__file__).parent / "results" / "ingest.json"
DEFAULT_PG_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
TARGET_SECONDS = 10.0
TARGET_RATIO = 10.0
# A baseline run slower than this is measured once unless --baseline-repeats says otherwise.
SLOW_BASELINE_SECONDS = 30.0

DUCKDB, POSTGRES, BASELINE = "platform → DuckDB", "platform → PostgreSQL", "pandas/to_sql → PostgreSQL"
STAGES = ("raw_batches", "clean_batches", "features")
STEPS = ("read", "compute", "write")


@dataclass(frozen=True)
class Run:
    seconds: float
    steps: dict[tuple[str, str], float]  # (stage, step) → seconds


class Stopwatch:
    """Adds up the time spent in each (stage, step) of one run."""

    def __init__(self):
        self.steps: dict[tuple[str, str], float] = defaultdict(float)

    @contextmanager
    def __call__(self, stage: str, step: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.steps[(stage, step)] += time.perf_counter() - start


def run_platform(url: str, batches: list[bytes]) -> tuple[Run, int]:
    """Each batch through raw_batches, clean_batches and features in turn, with the assets' calls; also the rows stored."""
    store = open_warehouse(url)
    watch = Stopwatch()
    start = time.perf_counter()
    for index, content in enumerate(batches, start=1):
        source_file = batch_file_name(index)
        batch_id = batch_id_for(Path(source_file))
        with watch("raw_batches", "read"):
            elsewhere = loaded_elsewhere(store, batch_id)
        with watch("raw_batches", "compute"):
            parsed = parse_batch(
                content, batch_id=batch_id, source_file=source_file, loaded_elsewhere=elsewhere, now=datetime.now(UTC)
            )
        with watch("raw_batches", "write"):
            store.replace_batch(
                {"raw_batches": (schema.RAW_SCHEMA, parsed.rows), "rejected_rows": (schema.REJECTED_SCHEMA, parsed.rejected)},
                batch_id,
            )
        with watch("clean_batches", "read"):
            raw = store.read_table("raw_batches", batch_id)
        with watch("clean_batches", "compute"):
            cleaned = clean(raw).frame
        with watch("clean_batches", "write"):
            store.replace_batch({"clean_batches": (schema.CLEAN_SCHEMA, cleaned)}, batch_id)
        with watch("features", "read"):
            clean_rows = store.read_table("clean_batches", batch_id)
        with watch("features", "compute"):
            table = build_features(clean_rows)
        with watch("features", "write"):
            store.replace_batch({"features": (FEATURE_SCHEMA, table)}, batch_id)
    seconds = time.perf_counter() - start
    stored = store.query("SELECT count(*) AS n FROM features")["n"][0]
    return Run(seconds, dict(watch.steps)), stored


def read_seed_csv(csv_bytes: bytes) -> pd.DataFrame:
    # keep_default_na=False keeps "None" (test not taken) a category instead of pandas' NaN.
    with warnings.catch_warnings():
        # payer_code is NaN in whole parser chunks; the mixed object column it gives is harmless.
        warnings.simplefilter("ignore", pd.errors.DtypeWarning)
        return pd.read_csv(io.BytesIO(csv_bytes), na_values=schema.MISSING, keep_default_na=False)


def pandas_icd9_group(codes: pd.Series) -> pd.Series:
    """The chapter groups of lib/cleaning.icd9_group, first matching rule wins; V and E codes are 'other'."""
    whole = np.floor(pd.to_numeric(codes, errors="coerce"))
    rules = {
        "circulatory": whole.between(390, 459) | (whole == 785),
        "respiratory": whole.between(460, 519) | (whole == 786),
        "digestive": whole.between(520, 579) | (whole == 787),
        "diabetes": whole == 250,
        "injury": whole.between(800, 999),
        "musculoskeletal": whole.between(710, 739),
        "genitourinary": whole.between(580, 629) | (whole == 788),
        "neoplasms": whole.between(140, 239),
    }
    groups = np.select(list(rules.values()), list(rules), default="other")
    return pd.Series(groups, index=codes.index, dtype=object).where(codes.notna())


def pandas_clean(raw: pd.DataFrame) -> pd.DataFrame:
    """The clinical exclusions, age in years, ICD-9 groups and the 30-day label, in pandas."""
    death_or_hospice = raw["discharge_disposition_id"].isin(schema.DEATH_OR_HOSPICE_DISPOSITIONS)
    frame = raw[~death_or_hospice & (raw["gender"] != schema.INVALID_GENDER)].copy()
    frame["age_years"] = frame["age"].map({b: int(b[1:-1].split("-")[0]) + 5 for b in schema.AGE_BRACKETS})
    for i in (1, 2, 3):
        frame[f"diag_{i}_group"] = pandas_icd9_group(frame[f"diag_{i}"])
    for name in ("A1Cresult", "max_glu_serum"):
        frame[name] = frame[name].replace("None", schema.NOT_MEASURED)
    frame[schema.LABEL_30D] = frame[schema.LABEL] == "<30"
    return frame[[c.name for c in schema.CLEAN_COLUMNS]]


def pandas_features(clean_rows: pd.DataFrame) -> pd.DataFrame:
    """The columns of lib/features.build_features, in pandas, without the batch_id the baseline does not have."""
    medications = clean_rows[list(MEDICATION_FEATURES)]
    derived = {
        "prior_visits": clean_rows["number_outpatient"] + clean_rows["number_emergency"] + clean_rows["number_inpatient"],
        "medications_prescribed": (medications != "No").sum(axis=1),
        "medication_changes": medications.isin(("Up", "Down")).sum(axis=1),
        "weight_recorded": clean_rows["weight"].notna(),
    }
    columns = {name: clean_rows[name] for name in (*schema.IDENTIFIERS, *LABEL_COLUMNS)}
    columns |= {name: (derived[name] if name in derived else clean_rows[name]).astype("float64") for name in NUMERIC_FEATURES}
    columns |= {name: clean_rows[name].fillna(MISSING_CATEGORY).astype(str) for name in CATEGORICAL_FEATURES}
    return pd.DataFrame(columns)


def run_baseline(url: sa.URL, csv_bytes: bytes) -> tuple[Run, int]:
    """The seeds' way: the whole file through pandas, each table appended with DataFrame.to_sql; also the rows stored."""
    engine = sa.create_engine(url)
    watch = Stopwatch()
    start = time.perf_counter()
    with watch("raw_batches", "compute"):
        raw = read_seed_csv(csv_bytes)
    with watch("raw_batches", "write"):
        raw.to_sql("raw_batches", engine, if_exists="append", index=False)
    with watch("clean_batches", "compute"):
        cleaned = pandas_clean(raw)
    with watch("clean_batches", "write"):
        cleaned.to_sql("clean_batches", engine, if_exists="append", index=False)
    with watch("features", "compute"):
        table = pandas_features(cleaned)
    with watch("features", "write"):
        table.to_sql("features", engine, if_exists="append", index=False)
    seconds = time.perf_counter() - start
    with engine.connect() as connection:
        stored = connection.execute(sa.text("SELECT count(*) FROM features")).scalar_one()
    engine.dispose()
    return Run(seconds, dict(watch.steps)), stored


def check_same_work(csv_bytes: bytes) -> int:
    """The feature rows both ways must be equal, or the ratio compares different work; returns their count."""
    nothing_loaded = pl.DataFrame(schema={"encounter_id": pl.Int64, schema.BATCH_ID: pl.String})
    parsed = parse_batch(csv_bytes, batch_id="all", source_file="all.csv", loaded_elsewhere=nothing_loaded, now=datetime.now(UTC))
    ours = build_features(clean(parsed.rows).frame).drop(schema.BATCH_ID).sort("encounter_id")
    theirs = pl.from_pandas(pandas_features(pandas_clean(read_seed_csv(csv_bytes)))).sort("encounter_id")
    fix = f"fix pandas_clean or pandas_features in {__file__}"
    if ours.height != theirs.height:
        sys.exit(f"the pandas baseline makes {theirs.height} feature rows; the platform makes {ours.height}; {fix}")
    differing = [name for name in ours.columns if not ours[name].equals(theirs[name].cast(ours[name].dtype))]
    if differing:
        sys.exit(f"the pandas baseline computes other values than the platform in columns {differing}; {fix}")
    return ours.height


@contextmanager
def fresh_database(server_url: str) -> Iterator[sa.URL]:
    """A new, empty database on the server, dropped afterwards even if the run fails."""
    name = f"readmission_bench_{secrets.token_hex(4)}"
    with psycopg.connect(server_url, autocommit=True) as admin:
        admin.execute(f"CREATE DATABASE {name}")
    try:
        yield sa.make_url(server_url).set(drivername="postgresql", database=name)
    finally:
        with psycopg.connect(server_url, autocommit=True) as admin:
            admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@contextmanager
def fresh_duckdb() -> Iterator[str]:
    with tempfile.TemporaryDirectory(prefix="readmission_bench_") as folder:
        yield f"duckdb:///{folder}/warehouse.duckdb"


def measure(backend: str, run: Callable[[], tuple[Run, int]], expected_rows: int) -> Run:
    result, stored = run()
    if stored != expected_rows:
        sys.exit(f"{backend}: the features table holds {stored} rows after the run; expected {expected_rows}")
    print(f"  {backend:<28} {result.seconds:7.2f} s", flush=True)
    return result


def summarize(runs: list[Run], rows: int) -> dict:
    median = statistics.median(r.seconds for r in runs)
    return {
        "runs_seconds": [round(r.seconds, 3) for r in runs],
        "median_seconds": round(median, 3),
        "rows_per_second": round(rows / median),
        "stages_median_seconds": {
            stage: {step: round(statistics.median(r.steps[(stage, step)] for r in runs), 3) for step in STEPS if (stage, step) in runs[0].steps}
            for stage in STAGES
        },
    }


def report(results: dict) -> str:
    backends = results["backends"]
    lines = [f"{'backend':<28} {'median s':>9} {'rows/s':>9}  runs", "-" * 60]
    lines += [
        f"{name:<28} {b['median_seconds']:9.2f} {b['rows_per_second']:9,d}  {len(b['runs_seconds'])}"
        for name, b in backends.items()
    ]
    lines += ["", f"{'per stage, median s':<28} {'stage':<14}" + "".join(f"{s:>8}" for s in STEPS), "-" * 66]
    for name, b in backends.items():
        for stage, steps in b["stages_median_seconds"].items():
            # The baseline never reads back from the database between stages.
            lines.append(f"{name:<28} {stage:<14}" + "".join(f"{steps[s]:8.2f}" if s in steps else f"{'—':>8}" for s in STEPS))
    targets = results["targets"]
    lines += ["", f"targets ({results['rows']:,} rows, {results['batches']} batches)"]
    for name, met in targets["under_10_seconds"].items():
        lines.append(f"  {name} under {TARGET_SECONDS:.0f} s: {'met' if met else 'NOT met'}")
    if (ratio := results["ratio_postgres_over_baseline"]) is not None:
        met = targets["ratio_at_least_10x"]
        lines.append(f"  PostgreSQL throughput / baseline = {ratio:.2f}× (≥ {TARGET_RATIO:.0f}×: {'met' if met else 'NOT met'})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=3, help="runs of each platform backend (default 3)")
    parser.add_argument(
        "--baseline-repeats",
        type=int,
        help=f"runs of the pandas baseline (default: as --repeats, or 1 if a run takes over {SLOW_BASELINE_SECONDS:.0f} s)",
    )
    parser.add_argument("--skip-postgres", action="store_true", help="DuckDB only; no PostgreSQL, so no baseline")
    args = parser.parse_args(argv)
    server_url = os.environ.get("READMISSION_BENCH_PG_URL", DEFAULT_PG_URL)

    csv_bytes = read_source_bytes()
    batches = split_batches(csv_bytes)
    rows = sum(len(batch.splitlines()) - 1 for batch in batches)
    feature_rows = check_same_work(csv_bytes)
    print(f"{rows:,} encounters in {len(batches)} batches → {feature_rows:,} feature rows; noisy machine, so medians")

    runs: dict[str, list[Run]] = defaultdict(list)
    baseline_repeats = args.baseline_repeats
    # Rounds interleave the backends so drift in the shared machine's load falls on all of them alike.
    for round_number in range(1, max(args.repeats, baseline_repeats or 0) + 1):
        print(f"round {round_number}", flush=True)
        if round_number <= args.repeats:
            with fresh_duckdb() as url:
                runs[DUCKDB].append(measure(DUCKDB, lambda: run_platform(url, batches), feature_rows))
            if not args.skip_postgres:
                with fresh_database(server_url) as url:
                    pg_url = url.render_as_string(hide_password=False)
                    runs[POSTGRES].append(measure(POSTGRES, lambda: run_platform(pg_url, batches), feature_rows))
        if not args.skip_postgres and round_number <= (baseline_repeats or args.repeats):
            with fresh_database(server_url) as url:
                baseline_url = url.set(drivername="postgresql+psycopg")
                runs[BASELINE].append(measure(BASELINE, lambda: run_baseline(baseline_url, csv_bytes), feature_rows))
            if baseline_repeats is None and runs[BASELINE][0].seconds > SLOW_BASELINE_SECONDS:
                baseline_repeats = 1

    backends = {name: summarize(measured, rows) for name, measured in runs.items()}
    ratio = None
    if BASELINE in backends:
        ratio = round(backends[POSTGRES]["rows_per_second"] / backends[BASELINE]["rows_per_second"], 3)
    results = {
        "measured_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
        "versions": {"polars": pl.__version__, "duckdb": duckdb.__version__, "pandas": pd.__version__, "sqlalchemy": sa.__version__},
        "rows": rows,
        "batches": len(batches),
        "feature_rows": feature_rows,
        "backends": backends,
        "ratio_postgres_over_baseline": ratio,
        "targets": {
            "under_10_seconds": {
                name: backends[name]["median_seconds"] < TARGET_SECONDS for name in (DUCKDB, POSTGRES) if name in backends
            },
            "ratio_at_least_10x": ratio >= TARGET_RATIO if ratio is not None else None,
        },
    }
    print("\n" + report(results))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n")
    print(f"\nwritten to {RESULTS.relative_to(Path.cwd()) if RESULTS.is_relative_to(Path.cwd()) else RESULTS}")


if __name__ == "__main__":
    main()
