"""How each model version does on the predictions it actually made, once their outcomes are known.

Outcomes are joined to the prediction log by `request_id`; a request a version answered more than once (a retry, an
explanation after a prediction) counts once for it, as its last answer. The join runs as outcomes land: each file of
outcomes is joined once, to the answers logged by then, and kept in the warehouse (`update_joined`), so a measurement
reads what earlier ones joined instead of the whole log. Each version's figures come with
percentile intervals from resampling its predictions (`metrics.resampled_intervals`): the log holds no patient id, so
each outcome is a draw of its own. Judged against the version's test figures from its promotion, a shortfall counts
only where the interval cannot reach the promised figure.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime

import numpy as np
import polars as pl

from readmission_platform.lib import metrics
from readmission_platform.lib.outcomes import OUTCOMES
from readmission_platform.lib.warehouse import Warehouse, literal

LIVE_TABLE, PERIOD_TABLE = "live_performance", "live_performance_by_day"
LIVE_SCHEMA: dict[str, pl.DataType] = {
    "model_version": pl.String(), "metric": pl.String(), "estimate": pl.Float64(), "lower": pl.Float64(),
    "upper": pl.Float64(), "test": pl.Float64(), "outcomes": pl.Int64(), "readmitted": pl.Int64(),
    "first_predicted_at": pl.Datetime("us", "UTC"), "last_predicted_at": pl.Datetime("us", "UTC"),
    "computed_at": pl.Datetime("us", "UTC"),
    # What the figures were computed from (`version_inputs`); added after the table was first made, NULL in rows
    # written before, which are then computed again.
    "inputs": pl.String(),
}  # fmt: skip
_FIGURE_SCHEMA = {k: v for k, v in LIVE_SCHEMA.items() if k not in ("computed_at", "inputs")}
PERIOD_SCHEMA: dict[str, pl.DataType] = {
    "model_version": pl.String(), "period": pl.Datetime("us", "UTC"), "outcomes": pl.Int64(),
    "roc_auc": pl.Float64(), "brier": pl.Float64(), "observed_rate": pl.Float64(), "mean_predicted": pl.Float64(),
}  # fmt: skip
# The figures a promotion decision records of a version's test patients (promotion_decisions' challenger columns).
TEST_FIGURES = ("roc_auc", "pr_auc", "brier")
PREDICTION_COLUMNS = ("request_id", "predicted_at", "model_version", "probability", "decision")
# The running join, in the warehouse: each stored outcome with the answers it was joined to, one batch_id per file of
# outcomes, and a row per file joined (also of one that matched no answer), with what it held when it was joined.
JOINED, JOINED_FILES = "live_outcome_predictions", "live_outcome_files"
_TIME = pl.Datetime("us", "UTC")
JOINED_SCHEMA: dict[str, pl.DataType] = {
    "batch_id": pl.String(), "request_id": pl.String(), "predicted_at": _TIME, "model_version": pl.String(),
    "probability": pl.Float64(), "decision": pl.Boolean(), "readmitted_30d": pl.Boolean(),
}  # fmt: skip
FILE_SCHEMA: dict[str, pl.DataType] = {
    "batch_id": pl.String(), "ingested_at": _TIME, "outcomes": pl.Int64(), "readmitted": pl.Int64(),
    "joined": pl.Int64(), "joined_at": _TIME,
}  # fmt: skip
# What tells a file of outcomes stored again (the outcomes asset run again on it) from the one joined.
_FINGERPRINT = ("ingested_at", "outcomes", "readmitted")


def _version_order(version: pl.Expr) -> pl.Expr:
    return version.cast(pl.Int64, strict=False)


def join_outcomes(predictions: pl.DataFrame, outcomes: pl.DataFrame, carry: Sequence[str] = ()) -> pl.DataFrame:
    """One row per (version, outcome) with an answer: PREDICTION_COLUMNS, readmitted_30d and the outcomes' `carry`
    columns, oldest first."""
    # Joined first, each version on its own: a request is then named by its outcome's row number, and finding a
    # version's last answer to it compares integers instead of the (version, request id) text of every prediction.
    numbered = outcomes.select("request_id", "readmitted_30d", *carry).with_row_index("outcome")
    parts = [
        rows.join(numbered, on="request_id", how="inner", maintain_order="left")
        .filter(pl.col("outcome").is_last_distinct())
        .drop("outcome")
        for rows in predictions.select(PREDICTION_COLUMNS).partition_by("model_version", maintain_order=False)
    ]
    if not parts:
        return predictions.select(PREDICTION_COLUMNS).join(outcomes.select("request_id", "readmitted_30d", *carry), on="request_id")
    return pl.concat(parts).sort("predicted_at")


@dataclass(frozen=True)
class JoinUpdate:
    """What `update_joined` did: the files of outcomes joined (new or stored again) and the ones taken out."""

    joined: tuple[str, ...]
    removed: tuple[str, ...]
    rows: int
    """Rows (one per version and request with an outcome) the joined files added."""


def update_joined(
    store: Warehouse, read_log: Callable[[Sequence[str]], pl.DataFrame], now: datetime
) -> JoinUpdate:
    """Bring the running join up to the outcomes stored: each file of outcomes not joined yet, or stored again since
    it was, is joined to the answers `read_log` (request ids → PREDICTION_COLUMNS of the log) gives for its requests,
    and a file no longer stored is taken out. Each file is written in a transaction of its own."""
    stored = store.query(
        "SELECT batch_id, max(ingested_at) AS ingested_at, count(*) AS outcomes, "
        f"sum(CASE WHEN readmitted_30d THEN 1 ELSE 0 END) AS readmitted FROM {OUTCOMES} GROUP BY batch_id"
    )
    fingerprint = {k: v for k, v in FILE_SCHEMA.items() if k == "batch_id" or k in _FINGERPRINT}
    stored = stored.cast(fingerprint) if stored.width else pl.DataFrame(schema=fingerprint)
    done = store.query(f"SELECT {', '.join(fingerprint)} FROM {JOINED_FILES}")
    done = done.cast(fingerprint) if done.width else pl.DataFrame(schema=fingerprint)
    to_join = stored.join(done, on=list(fingerprint), how="anti").sort("batch_id")
    removed = done.join(stored, on="batch_id", how="anti")["batch_id"].sort().to_list()
    for batch_id in removed:
        with store.batch_writer(batch_id) as writer:
            writer.put(JOINED, JOINED_SCHEMA, pl.DataFrame(schema=JOINED_SCHEMA))
            writer.put(JOINED_FILES, FILE_SCHEMA, pl.DataFrame(schema=FILE_SCHEMA))
    if to_join.is_empty():
        return JoinUpdate((), tuple(removed), 0)
    files = ", ".join(literal(batch_id) for batch_id in to_join["batch_id"])
    outcomes = store.query(
        f"SELECT batch_id, request_id, readmitted_30d FROM {OUTCOMES} WHERE batch_id IN ({files}) ORDER BY batch_id, line_number"
    ).cast({"batch_id": pl.String, "request_id": pl.String, "readmitted_30d": pl.Boolean})
    joined = join_outcomes(read_log(outcomes["request_id"].unique().to_list()), outcomes, carry=("batch_id",))
    by_file = joined.select(list(JOINED_SCHEMA)).cast(JOINED_SCHEMA).partition_by("batch_id", as_dict=True)
    empty = pl.DataFrame(schema=JOINED_SCHEMA)
    for batch_id in to_join["batch_id"]:
        rows = by_file.get((batch_id,), empty)
        mark = to_join.filter(pl.col("batch_id") == batch_id).with_columns(joined=pl.lit(rows.height), joined_at=pl.lit(now))
        with store.batch_writer(batch_id) as writer:
            writer.put(JOINED, JOINED_SCHEMA, rows)
            writer.put(JOINED_FILES, FILE_SCHEMA, mark.select(list(FILE_SCHEMA)).cast(FILE_SCHEMA))
    return JoinUpdate(tuple(to_join["batch_id"]), tuple(removed), joined.height)


def read_joined(store: Warehouse, versions: Sequence[str] | None = None) -> pl.DataFrame:
    """The running join's rows (of `versions`, default all), as `join_outcomes` gives them but `request_id`: one per
    (version, request) with an outcome, oldest first."""
    columns = [name for name in PREDICTION_COLUMNS if name != "request_id"] + ["readmitted_30d"]
    where = f" WHERE model_version IN ({', '.join(literal(v) for v in versions) or 'NULL'})" if versions is not None else ""
    rows = store.query(f"SELECT {', '.join(columns)} FROM {JOINED}{where}")
    if not rows.width:
        return pl.DataFrame(schema={name: JOINED_SCHEMA[name] for name in columns})
    return rows.cast({name: JOINED_SCHEMA[name] for name in columns}).sort("predicted_at")


def version_inputs(store: Warehouse, settings: str) -> pl.DataFrame:
    """model_version, rows, inputs: each version's rows in the running join, and a digest of what its figures are
    computed from: the files of outcomes that gave it rows, each as it was joined, and `settings`."""
    found = store.query(
        f"SELECT j.model_version, j.batch_id, f.joined_at, count(*) AS rows FROM {JOINED} j "
        f"JOIN {JOINED_FILES} f ON f.batch_id = j.batch_id GROUP BY j.model_version, j.batch_id, f.joined_at"
    )
    schema = {"model_version": pl.String(), "rows": pl.Int64(), "inputs": pl.String()}
    if not found.height:
        return pl.DataFrame(schema=schema)
    digests = []
    for (version,), files in found.sort("batch_id").group_by("model_version", maintain_order=True):
        text = "\n".join([settings, *(f"{b} {at.isoformat()} {n}" for b, at, n in files.select("batch_id", "joined_at", "rows").iter_rows())])
        digests.append((version, int(files["rows"].sum()), hashlib.sha256(text.encode()).hexdigest()))
    return pl.DataFrame(digests, schema=schema, orient="row").sort(_version_order(pl.col("model_version")), maintain_order=True)


@dataclass(frozen=True)
class Measurement:
    """What `measure` stored: the figures (LIVE_SCHEMA) and the figures per period (PERIOD_SCHEMA), which versions
    were computed and which kept as stored, and how many outcomes have an answer."""

    figures: pl.DataFrame
    periods: pl.DataFrame
    computed: tuple[str, ...]
    kept: tuple[str, ...]
    outcomes: int


def measure(
    store: Warehouse, test: Mapping[str, Mapping[str, float]], *, now: datetime, resamples: int = 200, period: str = "1d", seed: int = 0
) -> Measurement:
    """Each version's live figures and figures per `period` from the running join, stored as LIVE_TABLE and
    PERIOD_TABLE. A version whose joined rows are the ones its stored figures were computed from (no file of outcomes
    joined or taken out for it since, the same settings) keeps them, with its `test` figures as they are now."""
    inputs = version_inputs(store, f"resamples={resamples} seed={seed} period={period}")
    store.add_columns(LIVE_TABLE, LIVE_SCHEMA)
    stored = store.query(f"SELECT * FROM {LIVE_TABLE}")
    kept = (
        stored.cast(LIVE_SCHEMA).join(inputs.select("model_version", "inputs"), on=["model_version", "inputs"], how="semi")
        if stored.width else pl.DataFrame(schema=LIVE_SCHEMA)
    )  # fmt: skip
    kept_versions = set(kept["model_version"])
    computed = [version for version in inputs["model_version"] if version not in kept_versions]
    joined = read_joined(store, computed)
    promised = pl.DataFrame(
        [(v, m, float(x)) for v, figures in test.items() for m, x in figures.items() if x is not None],
        schema={"model_version": pl.String(), "metric": pl.String(), "test": pl.Float64()}, orient="row",
    )  # fmt: skip
    fresh = live_figures(joined, test, resamples=resamples, seed=seed).join(
        inputs.select("model_version", "inputs"), on="model_version", how="left"
    ).with_columns(computed_at=pl.lit(now))
    kept = kept.drop("test").join(promised, on=["model_version", "metric"], how="left")
    figures = (
        pl.concat([kept.select(list(LIVE_SCHEMA)).cast(LIVE_SCHEMA), fresh.select(list(LIVE_SCHEMA)).cast(LIVE_SCHEMA)])
        .sort(_version_order(pl.col("model_version")), maintain_order=True)
    )
    stored_periods = store.query(f"SELECT * FROM {PERIOD_TABLE}") if kept_versions else pl.DataFrame()
    periods = by_period(joined, period)
    if stored_periods.width:
        kept_periods = stored_periods.select(list(PERIOD_SCHEMA)).cast(PERIOD_SCHEMA).filter(pl.col("model_version").is_in(list(kept_versions)))
        periods = pl.concat([kept_periods, periods]).sort("model_version", "period")
    # The periods first: a run stopped between the two writes leaves the figures of before, whose versions are then
    # computed again, periods and all.
    store.replace_table(PERIOD_TABLE, PERIOD_SCHEMA, periods)
    store.replace_table(LIVE_TABLE, LIVE_SCHEMA, figures)
    return Measurement(figures, periods, tuple(computed), tuple(sorted(kept_versions)), int(inputs["rows"].sum()))


def live_figures(
    joined: pl.DataFrame, test: Mapping[str, Mapping[str, float]], *, resamples: int = 200, seed: int = 0
) -> pl.DataFrame:
    """LIVE_SCHEMA but `computed_at` and `inputs`: each version's RESAMPLED_METRICS with intervals, beside its `test` figures
    (version → metric → value). A version whose outcomes are all of one kind has no rows yet."""

    def scored(version: str, rows: pl.DataFrame) -> pl.DataFrame | None:
        y = rows["readmitted_30d"].to_numpy().astype(np.int8)
        if not 0 < y.sum() < len(y):
            return None
        figures = metrics.resampled_intervals(
            y, rows["probability"].to_numpy(), rows["decision"].to_numpy(), resamples=resamples, seed=seed
        )
        promised = test.get(version, {})
        return figures.with_columns(
            model_version=pl.lit(version),
            test=pl.Series([promised.get(m) for m in figures["metric"]], dtype=pl.Float64),
            outcomes=pl.lit(len(y)),
            readmitted=pl.lit(int(y.sum())),
            first_predicted_at=pl.lit(rows["predicted_at"].min()),
            last_predicted_at=pl.lit(rows["predicted_at"].max()),
        )

    # The versions are scored on threads of their own: the work is numpy's and polars', which let go of the GIL.
    versions = [(version, rows) for (version,), rows in joined.group_by("model_version", maintain_order=True)]
    with ThreadPoolExecutor(max_workers=max(1, min(len(versions), os.cpu_count() or 1))) as pool:
        parts = [part for part in pool.map(lambda item: scored(*item), versions) if part is not None]
    if not parts:
        return pl.DataFrame(schema=_FIGURE_SCHEMA)
    return (
        pl.concat(parts)
        .sort(_version_order(pl.col("model_version")), maintain_order=True)
        .select(list(_FIGURE_SCHEMA))
        .cast(_FIGURE_SCHEMA)
    )


def by_period(joined: pl.DataFrame, every: str = "1d") -> pl.DataFrame:
    """PERIOD_SCHEMA: each version's ROC-AUC, Brier, observed and mean predicted rate per period of prediction time
    (ROC-AUC null in a period whose outcomes are all of one kind)."""
    y, p = pl.col("readmitted_30d").cast(pl.Float64), pl.col("probability")
    positives, outcomes = pl.col("positives"), pl.col("outcomes")
    return (
        joined.group_by("model_version", pl.col("predicted_at").dt.truncate(every).alias("period"))
        .agg(
            outcomes=pl.len(),
            positives=y.sum(),
            # ROC-AUC as the Mann-Whitney statistic: the readmitted's mean rank (ties averaged) above the lowest ranks.
            ranks=p.rank("average").filter(pl.col("readmitted_30d")).sum(),
            brier=((p - y) ** 2).mean(),
            observed_rate=y.mean(),
            mean_predicted=p.mean(),
        )
        .with_columns(
            roc_auc=pl.when((positives > 0) & (positives < outcomes)).then(
                (pl.col("ranks") - positives * (positives + 1) / 2) / (positives * (outcomes - positives))
            )
        )
        .select(list(PERIOD_SCHEMA))
        .cast(PERIOD_SCHEMA)
        .sort("model_version", "period")
    )


@dataclass(frozen=True)
class Limits:
    """When a version's live figures count as fallen short of what its promotion promised."""

    min_outcomes: int = 200
    """Below this many outcomes a version is not judged: its intervals are too wide to say anything."""
    roc_auc_error_margin: float = 0.05
    """Live ROC-AUC whose interval stays below the test ROC-AUC by more than this is an error, not a warning."""


@dataclass(frozen=True)
class Judgement:
    """What the live figures of one version say, in words; `level` is 'ok', 'warn' or 'error'."""

    version: str
    level: str
    findings: tuple[str, ...]


def _figure(table: pl.DataFrame, metric: str) -> dict:
    return table.filter(pl.col("metric") == metric).row(0, named=True)


def _shown(row: dict, name: str) -> str:
    return f"{name} {row['estimate']:.3f} (95 % interval {row['lower']:.3f}–{row['upper']:.3f})"


def judge_discrimination(figures: pl.DataFrame, version: str, limits: Limits) -> Judgement:
    """Has the live ROC-AUC of `version` fallen below its test ROC-AUC by more than its interval allows?"""
    table = figures.filter(pl.col("model_version") == version)
    if table.is_empty() or table["outcomes"][0] < limits.min_outcomes:
        found = 0 if table.is_empty() else table["outcomes"][0]
        return Judgement(version, "ok", (f"v{version} has {found} outcomes of both kinds so far; judged from {limits.min_outcomes}",))
    auc = _figure(table, "roc_auc")
    live = f"v{version}'s live {_shown(auc, 'ROC-AUC')} on {auc['outcomes']:,} outcomes"
    if auc["test"] is None or np.isnan(auc["test"]):
        return Judgement(version, "ok", (f"{live}; no test figure to compare with",))
    if auc["upper"] < auc["test"] - limits.roc_auc_error_margin:
        return Judgement(version, "error", (
            f"{live} is below its test ROC-AUC {auc['test']:.3f} by more than the interval allows and by more than "
            f"{limits.roc_auc_error_margin}: it no longer ranks readmissions as it was promoted to",))  # fmt: skip
    if auc["upper"] < auc["test"]:
        return Judgement(version, "warn", (f"{live} is below its test ROC-AUC {auc['test']:.3f} by more than the interval allows",))
    return Judgement(version, "ok", (f"{live} is within reach of its test ROC-AUC {auc['test']:.3f}",))


def judge_calibration(figures: pl.DataFrame, version: str, limits: Limits) -> Judgement:
    """Are the live probabilities of `version` still calibrated (slope 1, intercept 0 within their intervals), and
    better than predicting the observed rate for everyone (Brier)?"""
    table = figures.filter(pl.col("model_version") == version)
    if table.is_empty() or table["outcomes"][0] < limits.min_outcomes:
        found = 0 if table.is_empty() else table["outcomes"][0]
        return Judgement(version, "ok", (f"v{version} has {found} outcomes of both kinds so far; judged from {limits.min_outcomes}",))
    slope, intercept = _figure(table, "calibration_slope"), _figure(table, "calibration_intercept")
    brier, rate = _figure(table, "brier"), _figure(table, "observed_rate")
    base_rate_brier = rate["estimate"] * (1 - rate["estimate"])
    findings, level = [], "ok"
    if brier["lower"] > base_rate_brier:
        level = "error"
        findings.append(
            f"v{version}'s live {_shown(brier, 'Brier')} is worse than predicting the observed rate "
            f"{rate['estimate']:.3f} for everyone ({base_rate_brier:.3f}), which its promotion required it to beat"
        )
    if not slope["lower"] <= 1 <= slope["upper"]:
        level = "warn" if level == "ok" else level
        direction = "too extreme" if slope["upper"] < 1 else "too timid"
        findings.append(f"v{version}'s live calibration {_shown(slope, 'slope')} excludes 1: its probabilities are {direction}")
    if not intercept["lower"] <= 0 <= intercept["upper"]:
        level = "warn" if level == "ok" else level
        direction = "too low" if intercept["lower"] > 0 else "too high"
        findings.append(f"v{version}'s live calibration {_shown(intercept, 'intercept')} excludes 0: its probabilities are {direction} overall")
    if not findings:
        findings.append(f"v{version}'s live calibration {_shown(slope, 'slope')}, {_shown(intercept, 'intercept')} "
                        f"and {_shown(brier, 'Brier')} keep what its promotion promised")  # fmt: skip
    return Judgement(version, level, tuple(findings))


def clearly_worse(figures: pl.DataFrame, version: str, replaced: str, limits: Limits) -> str | None:
    """Why `version` is clearly worse live than the version it `replaced` (their ROC-AUC intervals do not overlap,
    each on enough outcomes), or None."""
    def auc(v: str) -> dict | None:
        table = figures.filter((pl.col("model_version") == v) & (pl.col("metric") == "roc_auc"))
        return table.row(0, named=True) if table.height and table["outcomes"][0] >= limits.min_outcomes else None

    new, old = auc(version), auc(replaced)
    if new is None or old is None or new["upper"] >= old["lower"]:
        return None
    return (
        f"live {_shown(new, 'ROC-AUC')} of v{version} on {new['outcomes']:,} outcomes is clearly below the "
        f"{_shown(old, 'ROC-AUC')} of v{replaced}, which it replaced, on {old['outcomes']:,}"
    )


def test_figures(decisions: pl.DataFrame) -> dict[str, dict[str, float]]:
    """Version → its TEST_FIGURES as its latest promotion decision recorded them (rows of promotion_decisions)."""
    if decisions.is_empty():
        return {}
    latest = (
        decisions.filter(pl.col("challenger_version").is_not_null())
        .sort("decided_at")
        .unique("challenger_version", keep="last")
    )
    return {
        row["challenger_version"]: {m: row[f"challenger_test_{m}"] for m in TEST_FIGURES}
        for row in latest.iter_rows(named=True)
    }
