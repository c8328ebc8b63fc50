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
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

# The warehouse imports its drivers on first use; importing them here keeps that one-time cost out of the timings.
import adbc_driver_postgresql.dbapi  # noqa: F401
import duckdb
import numpy as np
import pandas as pd
import polars as pl
import psycopg
import sqlalchemy as sa

from readmission_platform.defs.ingestion.assets import BatchTablesConfig, evaluate, passes
from readmission_platform.lib import schema
from readmission_platform.lib.cleaning import clean
from readmission_platform.lib.features import (
    CATEGORICAL_FEATURES,
    ENCOUNTER_NUMERIC_FEATURES,
    FEATURE_SCHEMA,
    LABEL_COLUMNS,
    MEDICATION_FEATURES,
    MISSING_CATEGORY,
    build_features,
)
from readmission_platform.lib.ingest import parse_batch
from readmission_platform.lib.landing import batch_file_name, batch_id_for, split_batches
from readmission_platform.lib.pipeline import NOTHING_LOADED, BatchRun, process_batch
from readmission_platform.lib.source import read_source_bytes
from readmission_platform.lib.warehouse import open_warehouse

RESULTS = Path(__file__).parent / "results" / "ingest.json"
DEFAULT_PG_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
TARGET_SECONDS = 10.0
TARGET_RATIO = 10.0
SLOW_BASELINE_SECONDS = 30.0

DUCKDB, POSTGRES, BASELINE = "duckdb", "postgresql", "baseline"
LABELS = {DUCKDB: "platform → DuckDB", POSTGRES: "platform → PostgreSQL", BASELINE: "pandas/to_sql → PostgreSQL"}
CHECKS = BatchTablesConfig()


@dataclass
class Run:
    """Wall seconds of one run, the seconds of each batch's pass in it, and the feature rows it stored."""

    seconds: float = 0.0
    passes: list[float] = field(default_factory=list)
    stored: int = 0


def gate(stage: str, run: BatchRun) -> bool:
    """The op's gate: every check of the stage, on what the pass computed."""
    return passes(evaluate(stage, run, CHECKS))


def run_platform(url: str, batches: list[bytes]) -> Run:
    """Each batch through the op's pass (`process_batch` with the checks as its gate), one batch after the other."""
    store = open_warehouse(url)
    run = Run()
    start = time.perf_counter()
    for index, content in enumerate(batches, start=1):
        source_file = batch_file_name(index)
        began = time.perf_counter()
        done = process_batch(
            store, batch_id_for(Path(source_file)), content=content, source_file=source_file, now=datetime.now(UTC), gate=gate
        )
        run.passes.append(time.perf_counter() - began)
        if done.written != ["raw_batches", "clean_batches", "features"]:
            sys.exit(f"{source_file}: the pass stopped after {done.written[-1]}; a blocking check failed")
    run.seconds = time.perf_counter() - start
    run.stored = store.query("SELECT count(*) AS n FROM features")["n"][0]
    return run


def in_memory(batches: list[bytes]) -> float:
    """Seconds of the same work without a warehouse: parse, clean, features and the checks of every batch."""
    start = time.perf_counter()
    loaded = NOTHING_LOADED
    for index, content in enumerate(batches, start=1):
        batch_id = batch_id_for(Path(batch_file_name(index)))
        run = BatchRun(batch_id, loaded_elsewhere=loaded)
        run.parsed = parse_batch(content, batch_id=batch_id, source_file=f"{batch_id}.csv", loaded_elsewhere=loaded, now=datetime.now(UTC))
        gate("raw_batches", run)
        run.cleaned = clean(run.parsed.rows)
        gate("clean_batches", run)
        run.features = build_features(run.cleaned.frame)
        gate("features", run)
        loaded = pl.concat([loaded, run.parsed.rows.select(pl.col("encounter_id").cast(pl.Int64), schema.BATCH_ID)])
    return time.perf_counter() - start


def read_seed_csv(csv_bytes: bytes) -> pd.DataFrame:
    # keep_default_na=False keeps "None" (test not taken) a category instead of pandas' NaN.
    with warnings.catch_warnings():
        # payer_code is all NaN in some parser chunks; the mixed object column this warns about is harmless.
        warnings.simplefilter("ignore", pd.errors.DtypeWarning)
        return pd.read_csv(io.BytesIO(csv_bytes), na_values=schema.MISSING, keep_default_na=False)


def pandas_icd9_group(codes: pd.Series) -> pd.Series:
    """The groups of lib/cleaning.icd9_group, the first matching rule winning; V and E codes are 'other'."""
    whole = np.floor(pd.to_numeric(codes, errors="coerce"))
    conditions = []
    for _, ranges, singles in schema.ICD9_RULES:
        condition = whole.isin(singles)
        for lo, hi in ranges:
            condition |= whole.between(lo, hi)
        conditions.append(condition)
    groups = np.select(conditions, [group for group, _, _ in schema.ICD9_RULES], default=schema.ICD9_OTHER)
    return pd.Series(groups, index=codes.index, dtype=object).where(codes.notna())


def pandas_clean(raw: pd.DataFrame) -> pd.DataFrame:
    """The clinical exclusions, age in years, ICD-9 groups and the 30-day label, in pandas."""
    death_or_hospice = raw["discharge_disposition_id"].isin(schema.DEATH_OR_HOSPICE_DISPOSITIONS)
    frame = raw[~death_or_hospice & (raw["gender"] != schema.INVALID_GENDER)].copy()
    frame["age_years"] = frame["age"].map(schema.AGE_MIDDLES)
    for i in (1, 2, 3):
        frame[f"diag_{i}_group"] = pandas_icd9_group(frame[f"diag_{i}"])
    for name in schema.NOT_MEASURED_COLUMNS:
        frame[name] = frame[name].replace(schema.NOT_TAKEN, schema.NOT_MEASURED)
    frame[schema.LABEL_30D] = frame[schema.LABEL] == schema.READMITTED_WITHIN_30_DAYS
    return frame[[c.name for c in schema.CLEAN_COLUMNS]]


def pandas_features(clean_rows: pd.DataFrame) -> pd.DataFrame:
    """The columns of lib/features.build_features in pandas, less the batch_id the baseline does not have."""
    medications = clean_rows[list(MEDICATION_FEATURES)]
    derived = {
        "prior_visits": clean_rows["number_outpatient"] + clean_rows["number_emergency"] + clean_rows["number_inpatient"],
        "medications_prescribed": (medications != "No").sum(axis=1),
        "medication_changes": medications.isin(("Up", "Down")).sum(axis=1),
        "weight_recorded": clean_rows["weight"].notna(),
    }
    columns = {name: clean_rows[name] for name in (*schema.IDENTIFIERS, *LABEL_COLUMNS)}
    columns |= {name: (derived[name] if name in derived else clean_rows[name]).astype("float64") for name in ENCOUNTER_NUMERIC_FEATURES}
    columns |= {name: clean_rows[name].fillna(MISSING_CATEGORY).astype(str) for name in CATEGORICAL_FEATURES}
    return pd.DataFrame(columns)


def run_baseline(url: sa.URL, csv_bytes: bytes) -> Run:
    """The seeds' way: the whole file through pandas, each table appended with DataFrame.to_sql."""
    engine = sa.create_engine(url)
    run = Run()
    start = time.perf_counter()
    raw = read_seed_csv(csv_bytes)
    raw.to_sql("raw_batches", engine, if_exists="append", index=False)
    cleaned = pandas_clean(raw)
    cleaned.to_sql("clean_batches", engine, if_exists="append", index=False)
    table = pandas_features(cleaned)
    table.to_sql("features", engine, if_exists="append", index=False)
    run.seconds = time.perf_counter() - start
    with engine.connect() as connection:
        run.stored = connection.execute(sa.text("SELECT count(*) FROM features")).scalar_one()
    engine.dispose()
    return run


def check_same_work(csv_bytes: bytes) -> int:
    """Fail unless the baseline computes the platform's feature rows, else the ratio compares unlike work."""
    parsed = parse_batch(csv_bytes, batch_id="all", source_file="all.csv", loaded_elsewhere=NOTHING_LOADED, now=datetime.now(UTC))
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
    """A new, empty database on the server, dropped afterwards even when the run fails."""
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


def measure(backend: str, batches: list[bytes], csv_bytes: bytes, server_url: str, feature_rows: int) -> Run:
    """One run of a backend into a warehouse of its own; fails if it did not store every feature row."""
    if backend == DUCKDB:
        with fresh_duckdb() as url:
            run = run_platform(url, batches)
    else:
        with fresh_database(server_url) as url:
            if backend == POSTGRES:
                run = run_platform(url.render_as_string(hide_password=False), batches)
            else:
                run = run_baseline(url.set(drivername="postgresql+psycopg"), csv_bytes)
    if run.stored != feature_rows:
        sys.exit(f"{LABELS[backend]}: the features table holds {run.stored} rows after the run; expected {feature_rows}")
    print(f"  {LABELS[backend]:<28} {run.seconds:7.2f} s", flush=True)
    return run


def prepared_tables(batches: list[bytes]) -> list[tuple[str, dict[str, tuple]]]:
    """Each batch's three tables as the assets write them, computed once, for the load-only comparison."""
    prepared = []
    loaded = NOTHING_LOADED
    for index, content in enumerate(batches, start=1):
        batch_id = batch_id_for(Path(batch_file_name(index)))
        parsed = parse_batch(content, batch_id=batch_id, source_file=f"{batch_id}.csv", loaded_elsewhere=loaded, now=datetime.now(UTC))
        cleaned = clean(parsed.rows).frame
        prepared.append(
            (
                batch_id,
                {
                    "raw_batches": (schema.RAW_SCHEMA, parsed.rows),
                    "rejected_rows": (schema.REJECTED_SCHEMA, parsed.rejected),
                    "clean_batches": (schema.CLEAN_SCHEMA, cleaned),
                    "features": (FEATURE_SCHEMA, build_features(cleaned)),
                },
            )
        )
    return prepared


def load_platform(url: str, prepared) -> float:
    """Seconds for the warehouse to replace each batch's rows of the four tables together, as the op does."""
    store = open_warehouse(url)
    start = time.perf_counter()
    for batch_id, tables in prepared:
        store.replace_batch(tables, batch_id)
    return time.perf_counter() - start


def load_baseline(url: sa.URL, prepared) -> float:
    """Seconds for DataFrame.to_sql to append the same rows, converted to pandas beforehand."""
    frames = [(table, tables[table][1].to_pandas()) for _, tables in prepared for table in ("raw_batches", "clean_batches", "features")]
    engine = sa.create_engine(url)
    start = time.perf_counter()
    for table, frame in frames:
        frame.to_sql(table, engine, if_exists="append", index=False)
    seconds = time.perf_counter() - start
    engine.dispose()
    return seconds


def measure_load(prepared, server_url: str) -> tuple[float, float]:
    with fresh_database(server_url) as url:
        platform_seconds = load_platform(url.render_as_string(hide_password=False), prepared)
    with fresh_database(server_url) as url:
        baseline_seconds = load_baseline(url.set(drivername="postgresql+psycopg"), prepared)
    print(f"  load only: platform {platform_seconds:.2f} s, to_sql {baseline_seconds:.2f} s", flush=True)
    return platform_seconds, baseline_seconds


def summarize(runs: list[Run], rows: int) -> dict:
    median = statistics.median(r.seconds for r in runs)
    summary = {
        "runs_seconds": [round(r.seconds, 3) for r in runs],
        "median_seconds": round(median, 3),
        "rows_per_second": round(rows / median),
    }
    if runs[0].passes:
        summary["batch_pass_median_seconds"] = round(statistics.median(p for r in runs for p in r.passes), 3)
    return summary


def report(results: dict) -> str:
    backends, targets = results["backends"], results["targets"]
    lines = [f"{'backend':<28} {'median s':>9} {'rows/s':>9}  runs", "-" * 56]
    lines += [
        f"{LABELS[name]:<28} {b['median_seconds']:9.2f} {b['rows_per_second']:9,d}  {len(b['runs_seconds'])}"
        for name, b in backends.items()
    ]
    lines += ["", "one batch's pass (15,000 encounters: parse, clean, features, checks, load), median s:"]
    lines += [f"  {LABELS[name]:<28} {b['batch_pass_median_seconds']:.3f}" for name, b in backends.items() if "batch_pass_median_seconds" in b]
    lines.append(f"  the same work without a warehouse (all {results['batches']} batches), median s: {results['in_memory_median_seconds']:.2f}")
    lines += ["", f"targets ({results['rows']:,} encounters in {results['batches']} batches)"]
    for name, met in targets["under_10_seconds"].items():
        lines.append(f"  {LABELS[name]} under {TARGET_SECONDS:.0f} s: {'met' if met else 'NOT met'}")
    if (duckdb_first := targets["duckdb_at_most_postgres"]) is not None:
        over = backends[DUCKDB]["median_seconds"] / backends[POSTGRES]["median_seconds"]
        lines.append(f"  {LABELS[DUCKDB]} / {LABELS[POSTGRES]} time = {over:.2f}× (≤ 1×: {'met' if duckdb_first else 'NOT met'})")
    if (ratio := results["ratio_postgres_over_baseline"]) is not None:
        verdict = "met" if targets["ratio_at_least_10x"] else "NOT met"
        lines.append(f"  {LABELS[POSTGRES]} throughput / baseline = {ratio:.2f}× (≥ {TARGET_RATIO:.0f}×: {verdict})")
    if load := results["load_only"]:
        lines += [
            "",
            "loading the same three tables into PostgreSQL (computed beforehand), median s:",
            f"  platform (COPY into staged partitions, per batch) {load['platform_median_seconds']:.2f}"
            f"   DataFrame.to_sql {load['to_sql_median_seconds']:.2f}   ratio {load['ratio']:.1f}×",
        ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=3, help="runs of each platform backend (default 3)")
    parser.add_argument(
        "--baseline-repeats",
        type=int,
        help=f"runs of the baseline (default: as --repeats, or 1 when its first run takes over {SLOW_BASELINE_SECONDS:.0f} s)",
    )
    parser.add_argument("--skip-postgres", action="store_true", help="DuckDB only, hence no baseline either")
    args = parser.parse_args(argv)
    if args.repeats < 1 or (args.baseline_repeats is not None and args.baseline_repeats < 1):
        parser.error("--repeats and --baseline-repeats need at least 1 run to take a median of")
    server_url = os.environ.get("READMISSION_BENCH_PG_URL", DEFAULT_PG_URL)

    csv_bytes = read_source_bytes()
    batches = split_batches(csv_bytes)
    rows = sum(len(batch.splitlines()) - 1 for batch in batches)
    feature_rows = check_same_work(csv_bytes)
    print(f"{rows:,} encounters in {len(batches)} batches, {feature_rows:,} feature rows")

    platforms = [DUCKDB] if args.skip_postgres else [DUCKDB, POSTGRES]
    baseline_repeats = 0 if args.skip_postgres else args.baseline_repeats
    runs: dict[str, list[Run]] = defaultdict(list)
    # Rounds interleave the backends, so a change in the shared machine's load falls on all of them alike.
    for round_number in range(1, max(args.repeats, baseline_repeats or 0) + 1):
        print(f"round {round_number}", flush=True)
        due = platforms if round_number <= args.repeats else []
        if round_number <= (args.repeats if baseline_repeats is None else baseline_repeats):
            due = [*due, BASELINE]
        for backend in due:
            runs[backend].append(measure(backend, batches, csv_bytes, server_url, feature_rows))
        if baseline_repeats is None and runs[BASELINE][0].seconds > SLOW_BASELINE_SECONDS:
            baseline_repeats = 1

    loads = [] if args.skip_postgres else [measure_load(prepared_tables(batches), server_url) for _ in range(args.repeats)]
    computed = [in_memory(batches) for _ in range(args.repeats)]

    backends = {name: summarize(measured, rows) for name, measured in runs.items()}
    ratio = None
    if BASELINE in backends:
        ratio = round(backends[BASELINE]["median_seconds"] / backends[POSTGRES]["median_seconds"], 3)
    results = {
        "measured_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
        "versions": {"polars": pl.__version__, "duckdb": duckdb.__version__, "pandas": pd.__version__, "sqlalchemy": sa.__version__},
        "rows": rows,
        "batches": len(batches),
        "feature_rows": feature_rows,
        "backends": backends,
        "ratio_postgres_over_baseline": ratio,
        "in_memory_median_seconds": round(statistics.median(computed), 3),
        "load_only": None
        if not loads
        else {
            "platform_median_seconds": round(statistics.median(p for p, _ in loads), 3),
            "to_sql_median_seconds": round(statistics.median(b for _, b in loads), 3),
            "ratio": round(statistics.median(b for _, b in loads) / statistics.median(p for p, _ in loads), 3),
        },
        "targets": {
            "under_10_seconds": {name: backends[name]["median_seconds"] < TARGET_SECONDS for name in platforms},
            "duckdb_at_most_postgres": None
            if POSTGRES not in backends
            else backends[DUCKDB]["median_seconds"] <= backends[POSTGRES]["median_seconds"],
            "ratio_at_least_10x": None if ratio is None else ratio >= TARGET_RATIO,
        },
    }
    print("\n" + report(results))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n")
    print(f"\nwritten to {RESULTS}")


if __name__ == "__main__":
    main()
