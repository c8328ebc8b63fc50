"""Fit one setting of the test suite's gradient-boosting candidate (`sample_candidates`: the first 20,000 encounters)
with OpenMP's default threads (one per core) and with one thread, alternating rounds, and print the medians and their
ratio. Run it beside other work to see what a loaded machine does to spinning OpenMP threads; not in `make bench`."""

from __future__ import annotations

import argparse
import statistics
import time
from datetime import UTC, datetime

import polars as pl
from threadpoolctl import threadpool_limits

from readmission_platform.lib.cleaning import clean
from readmission_platform.lib.features import build_features
from readmission_platform.lib.history import with_history
from readmission_platform.lib.ingest import parse_batch
from readmission_platform.lib.source import read_source_bytes
from readmission_platform.lib.splitting import SPLIT, assign_split
from readmission_platform.lib.training import HIST_GRADIENT_BOOSTING, PARAM_GRIDS, train_candidates

NOTHING_LOADED = pl.DataFrame(schema={"encounter_id": pl.Int64, "batch_id": pl.String})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=3)
    rounds = parser.parse_args().rounds
    raw = parse_batch(read_source_bytes(), batch_id="full", source_file="diabetic_data.csv",
                      loaded_elsewhere=NOTHING_LOADED, now=datetime.now(UTC)).rows  # fmt: skip
    head = assign_split(with_history(build_features(clean(raw).frame), raw)).head(20_000)
    train, validation = (head.filter(pl.col(SPLIT) == name) for name in ("train", "validation"))
    grid = {HIST_GRADIENT_BOOSTING: PARAM_GRIDS[HIST_GRADIENT_BOOSTING][:1]}

    def fit() -> None:
        train_candidates(train, validation, families=(HIST_GRADIENT_BOOSTING,), grids=grid)

    seconds: dict[str, list[float]] = {"default threads": [], "one thread": []}
    for _ in range(rounds):
        for name, times in seconds.items():
            started = time.perf_counter()
            if name == "one thread":
                with threadpool_limits(1):
                    fit()
            else:
                fit()
            times.append(time.perf_counter() - started)
            print(f"{name}: {times[-1]:.1f} s", flush=True)
    default, one = (statistics.median(times) for times in seconds.values())
    print(f"median: default threads {default:.1f} s, one thread {one:.1f} s, ratio {default / one:.1f}x")


if __name__ == "__main__":
    main()
