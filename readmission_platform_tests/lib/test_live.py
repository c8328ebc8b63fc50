"""Live figures against scikit-learn's own on known data, and the judgements on planted degradations."""

from datetime import UTC, datetime, timedelta

import numpy as np
import polars as pl
import pytest
from scipy.optimize import brentq
from scipy.special import expit
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import average_precision_score, brier_score_loss, roc_auc_score

from readmission_platform.lib import live, metrics


def logged(n: int, version: str = "3", seed: int = 0, flip: float = 0.0) -> tuple[pl.DataFrame, pl.DataFrame]:
    """`n` predictions of one version with calibrated probabilities, and their outcomes; `flip` of the outcomes
    (chosen at random) turned over, as a model that stopped fitting its patients would see."""
    rng = np.random.default_rng(seed)
    p = rng.beta(1.2, 9, n)
    y = rng.random(n) < p
    flipped = rng.random(n) < flip
    start = datetime(2026, 3, 1, tzinfo=UTC)
    predictions = pl.DataFrame({
        "request_id": [f"{version}-{i}" for i in range(n)],
        "predicted_at": [start + timedelta(minutes=10 * i) for i in range(n)],
        "model_version": version, "probability": p, "decision": p >= 0.15,
    })  # fmt: skip
    return predictions, pl.DataFrame({"request_id": predictions["request_id"], "readmitted_30d": y ^ flipped})


def test_the_estimates_are_scikit_learn_s_on_the_same_predictions():
    predictions, outcomes = logged(5_000)
    figures = live.live_figures(live.join_outcomes(predictions, outcomes), {"3": {"roc_auc": 0.7, "brier": 0.09}})
    y, p = outcomes["readmitted_30d"].to_numpy(), predictions["probability"].to_numpy()
    logit = np.log(p / (1 - p))
    fit = LogisticRegression(C=np.inf, tol=1e-10, max_iter=1_000).fit(logit[:, None], y)
    # Calibration in the large: the shift of the logits that makes the mean probability the observed rate.
    shift = brentq(lambda a: float(np.mean(expit(logit + a)) - y.mean()), -5, 5, xtol=1e-12)
    expected = {
        "roc_auc": roc_auc_score(y, p), "pr_auc": average_precision_score(y, p), "brier": brier_score_loss(y, p),
        "calibration_intercept": shift, "calibration_slope": fit.coef_[0, 0],
        "positive_rate": float((p >= 0.15).mean()), "observed_rate": float(y.mean()),
    }  # fmt: skip
    got = dict(zip(figures["metric"], figures["estimate"]))
    assert got == pytest.approx(expected, rel=1e-6, abs=1e-8)
    for row in figures.iter_rows(named=True):
        assert row["lower"] < row["estimate"] < row["upper"], row
    assert dict(zip(figures["metric"], figures["test"]))["roc_auc"] == 0.7
    assert figures["outcomes"].unique().to_list() == [5_000] and figures["readmitted"][0] == int(y.sum())


def test_the_grouped_resampling_gives_the_intervals_of_resampling_every_row():
    predictions, outcomes = logged(4_000, seed=3)
    y, p = outcomes["readmitted_30d"].to_numpy(), predictions["probability"].to_numpy()
    fast = metrics.resampled_intervals(y, p, p >= 0.15, resamples=400)
    rows = metrics.bootstrap_intervals(np.arange(len(y)), y, p, resamples=400)
    for name in metrics.BOOTSTRAP_METRICS:
        grouped, plain = fast.filter(pl.col("metric") == name).row(0, named=True), rows.filter(pl.col("metric") == name).row(0, named=True)
        width = plain["upper"] - plain["lower"]
        assert grouped["upper"] - grouped["lower"] == pytest.approx(width, rel=0.2), name
        assert grouped["lower"] == pytest.approx(plain["lower"], abs=0.2 * width), name


def test_a_request_counts_once_per_version_and_one_without_an_outcome_not_at_all():
    at = datetime(2026, 3, 1, tzinfo=UTC)
    predictions = pl.DataFrame({
        "request_id": ["a", "a", "a", "b", "c"], "predicted_at": [at + timedelta(seconds=s) for s in range(5)],
        "model_version": ["1", "1", "2", "1", "1"], "probability": [0.1, 0.2, 0.3, 0.4, 0.5],
        "decision": [False, True, True, True, True],
    })  # fmt: skip
    joined = live.join_outcomes(predictions, pl.DataFrame({"request_id": ["a", "b"], "readmitted_30d": [True, False]}))
    assert joined.select("model_version", "request_id", "probability").rows() == [("1", "a", 0.2), ("2", "a", 0.3), ("1", "b", 0.4)]


def test_an_undisturbed_version_passes_and_a_planted_degradation_fails_in_words():
    limits = live.Limits()
    test = {"3": {"roc_auc": 0.75, "pr_auc": 0.28, "brier": 0.095}}
    kept = live.live_figures(live.join_outcomes(*logged(3_000)), test)
    assert live.judge_discrimination(kept, "3", limits).level == "ok"
    assert live.judge_calibration(kept, "3", limits).level == "ok"

    degraded = live.live_figures(live.join_outcomes(*logged(3_000, flip=0.3)), test)
    discrimination = live.judge_discrimination(degraded, "3", limits)
    assert discrimination.level == "error"
    assert "below its test ROC-AUC 0.750 by more than the interval allows and by more than 0.05" in discrimination.findings[0]
    calibration = live.judge_calibration(degraded, "3", limits)
    assert calibration.level == "error" and "worse than predicting the observed rate" in calibration.findings[0]


def test_too_few_outcomes_are_not_judged_and_a_clearly_worse_version_is_named():
    few = live.live_figures(live.join_outcomes(*logged(150, flip=0.5)), {"3": {"roc_auc": 0.75}})
    assert live.judge_discrimination(few, "3", live.Limits()).findings == ("v3 has 150 outcomes of both kinds so far; judged from 200",)
    old, new = logged(3_000, version="2"), logged(3_000, version="3", seed=1, flip=0.3)
    figures = live.live_figures(
        live.join_outcomes(pl.concat([old[0], new[0]]), pl.concat([old[1], new[1]])), {}
    )
    assert live.clearly_worse(figures, "3", "2", live.Limits()).startswith("live ROC-AUC")
    assert live.clearly_worse(figures, "2", "3", live.Limits()) is None


def test_test_figures_are_each_version_s_latest_decision():
    decisions = pl.DataFrame({
        "decided_at": [datetime(2026, 1, d, tzinfo=UTC) for d in (1, 2, 3)], "challenger_version": ["1", "1", None],
        "challenger_test_roc_auc": [0.6, 0.65, None], "challenger_test_pr_auc": [0.2, 0.21, None],
        "challenger_test_brier": [0.1, 0.09, None],
    })  # fmt: skip
    assert live.test_figures(decisions) == {"1": {"roc_auc": 0.65, "pr_auc": 0.21, "brier": 0.09}}


def test_resamples_scored_together_are_scikit_learn_s_scores_of_each_weighted_set_ties_included():
    rng = np.random.default_rng(2)
    p = np.sort(np.round(rng.beta(1.2, 9, 2_000), 2))  # rounded: many rows share a probability
    y = (rng.random(len(p)) < p).astype(float)
    flagged = (p >= 0.15).astype(float)
    counts = rng.poisson(1.0, (3, len(p)))
    together = metrics.cell_scores(y, p, flagged, (p - y) ** 2, counts)
    for draw, weight in zip(together, counts):
        drawn = weight > 0
        w = weight[drawn].astype(float)
        expected = [
            roc_auc_score(y[drawn], p[drawn], sample_weight=w), average_precision_score(y[drawn], p[drawn], sample_weight=w),
            float(np.average((p[drawn] - y[drawn]) ** 2, weights=w)),
            *metrics.calibration_fit(y[drawn], p[drawn], w).values(),
            float(np.average(flagged[drawn], weights=w)), float(np.average(y[drawn], weights=w)),
        ]  # fmt: skip
        assert draw == pytest.approx(expected, rel=1e-9, abs=1e-12)


def test_the_daily_figures_are_scikit_learn_s_on_each_day():
    predictions, outcomes = logged(3_000, seed=4)  # ten minutes apart: about 21 days
    joined = live.join_outcomes(predictions, outcomes)
    days = live.by_period(joined, "1d")
    for row in days.iter_rows(named=True):
        day = joined.filter(pl.col("predicted_at").dt.truncate("1d") == row["period"])
        y, p = day["readmitted_30d"].to_numpy(), day["probability"].to_numpy()
        assert row["outcomes"] == len(y) and row["roc_auc"] == pytest.approx(roc_auc_score(y, p), rel=1e-9)
        assert row["brier"] == pytest.approx(brier_score_loss(y, p)) and row["observed_rate"] == pytest.approx(y.mean())
    assert days["outcomes"].sum() == 3_000


@pytest.fixture(params=["duckdb", pytest.param("postgres", marks=pytest.mark.postgres)])
def store(request, tmp_path):
    """An empty warehouse: a DuckDB file, or a schema of its own in the session's PostgreSQL database."""
    from readmission_platform.lib.warehouse import DuckDBWarehouse, PostgresWarehouse

    if request.param == "duckdb":
        return DuckDBWarehouse(tmp_path / "warehouse.duckdb")
    return PostgresWarehouse(request.getfixturevalue("pg_schema_url"))


def log_predictions(url: str, frame: pl.DataFrame) -> None:
    """Write `frame` (as `logged` gives it) through the service's own writer, a row at a time."""
    from readmission_platform.lib.encounter import FIELDS
    from readmission_platform.serving.model import SMOKE_ENCOUNTERS
    from readmission_platform.serving.prediction_log import PredictionLog

    log = PredictionLog(url, flush_seconds=0.05)
    inputs = {name: SMOKE_ENCOUNTERS[0].get(name) for name in FIELDS}
    for row in frame.drop("predicted_at").iter_rows(named=True):
        assert log.record([row | {"endpoint": "predict", "model_name": "m", "risk_band": "low", "inputs": inputs}]) == 0
    log.close()


def land(store, batch_id: str, outcomes: pl.DataFrame, at: datetime) -> None:
    from readmission_platform.lib.outcomes import OUTCOME_SCHEMA, OUTCOMES

    rows = outcomes.with_columns(
        batch_id=pl.lit(batch_id), known_at=pl.lit(at), source_file=pl.lit(f"{batch_id}.csv"),
        line_number=pl.int_range(2, outcomes.height + 2), ingested_at=pl.lit(at),
    ).select(list(OUTCOME_SCHEMA)).cast(OUTCOME_SCHEMA)  # fmt: skip
    store.replace_batch({OUTCOMES: (OUTCOME_SCHEMA, rows)}, batch_id)


def test_the_running_join_measures_what_joining_the_whole_log_measures_and_joins_each_file_once(store, tmp_path):
    from readmission_platform.lib.predictions import read_predictions

    url = f"sqlite:///{tmp_path / 'predictions.sqlite'}"
    old, new = logged(600, "3", seed=1), logged(400, "4", seed=2)
    retry = old[0].head(5).with_columns(pl.col("probability") / 2)  # v3 answered five requests again: the last counts
    log_predictions(url, pl.concat([old[0], new[0], retry]))
    outcomes = pl.concat([old[1], new[1]])
    at = datetime(2026, 4, 1, tzinfo=UTC)
    land(store, "outcomes_0001", outcomes.head(700), at)
    land(store, "outcomes_0002", outcomes.tail(300), at)
    calls = []

    def read_log(ids):
        calls.append(len(ids))
        return read_predictions(url, live.PREDICTION_COLUMNS, request_ids=ids)

    update = live.update_joined(store, read_log, at)
    assert update.joined == ("outcomes_0001", "outcomes_0002") and update.removed == () and update.rows == 1_000
    whole = live.join_outcomes(read_predictions(url, live.PREDICTION_COLUMNS), outcomes)
    running = live.read_joined(store)
    assert running.equals(whole.drop("request_id"))
    answered = store.query(f"SELECT probability FROM {live.JOINED} WHERE request_id = '3-0'")
    assert answered["probability"].to_list() == [old[0]["probability"][0] / 2]
    assert live.live_figures(running, {}).equals(live.live_figures(whole, {}))
    assert live.by_period(running).equals(live.by_period(whole))

    assert live.update_joined(store, read_log, at) == live.JoinUpdate((), (), 0) and calls == [1_000]  # nothing new: the log is not read
    assert live.read_joined(store).equals(running)

    # An answer logged after its outcome's file was joined is not counted, until the file is stored again.
    log_predictions(url, old[0].head(1).with_columns(model_version=pl.lit("4")))
    assert live.update_joined(store, read_log, at).joined == () and live.read_joined(store).equals(running)
    land(store, "outcomes_0001", outcomes.head(700), at + timedelta(hours=1))
    assert live.update_joined(store, read_log, at).joined == ("outcomes_0001",)
    late = store.query(f"SELECT model_version FROM {live.JOINED} WHERE request_id = '3-0' ORDER BY model_version")
    assert late["model_version"].to_list() == ["3", "4"]
    running = live.read_joined(store)

    land(store, "outcomes_0002", outcomes.tail(300).with_columns(pl.col("readmitted_30d").not_()), at + timedelta(days=1))
    again = live.update_joined(store, read_log, at)
    assert again.joined == ("outcomes_0002",) and calls[-1] == 300  # stored again: joined again, that file alone
    flipped = live.read_joined(store)
    late_outcome = int(outcomes["readmitted_30d"][0])  # v4's late answer to 3-0 counts its outcome too
    assert flipped.height == 1_001 and flipped["readmitted_30d"].sum() == (
        outcomes.head(700)["readmitted_30d"].sum() + late_outcome + 300 - outcomes.tail(300)["readmitted_30d"].sum()
    )

    with store.batch_writer("outcomes_0002") as writer:  # the file's outcomes taken out of the warehouse
        from readmission_platform.lib.outcomes import OUTCOME_SCHEMA, OUTCOMES

        writer.put(OUTCOMES, OUTCOME_SCHEMA, pl.DataFrame(schema=OUTCOME_SCHEMA))
    assert live.update_joined(store, read_log, at) == live.JoinUpdate((), ("outcomes_0002",), 0)
    assert live.read_joined(store).height == 701


def test_a_file_whose_requests_the_log_lacks_is_joined_once_to_nothing(store, tmp_path):
    url = f"sqlite:///{tmp_path / 'gone.sqlite'}"  # a log that was never written (or was lost)
    from readmission_platform.lib.predictions import read_predictions

    land(store, "outcomes_0001", logged(50)[1], datetime(2026, 4, 1, tzinfo=UTC))
    read_log = lambda ids: read_predictions(url, live.PREDICTION_COLUMNS, request_ids=ids)  # noqa: E731
    assert live.update_joined(store, read_log, datetime.now(UTC)) == live.JoinUpdate(("outcomes_0001",), (), 0)
    assert live.update_joined(store, read_log, datetime.now(UTC)) == live.JoinUpdate((), (), 0)
    assert live.read_joined(store).is_empty() and live.read_joined(store).columns == ["predicted_at", "model_version", "probability", "decision", "readmitted_30d"]


def test_a_warehouse_without_outcomes_yet_joins_nothing(store):
    assert live.update_joined(store, lambda ids: pytest.fail("the log was read"), datetime.now(UTC)) == live.JoinUpdate((), (), 0)
    assert live.read_joined(store).is_empty()


def test_a_version_whose_outcomes_did_not_change_keeps_its_figures_and_the_rest_are_computed_as_from_scratch(store, tmp_path):
    from readmission_platform.lib.predictions import read_predictions

    url = f"sqlite:///{tmp_path / 'predictions.sqlite'}"
    old, new = logged(500, "3", seed=1), logged(400, "4", seed=2)
    log_predictions(url, pl.concat([old[0], new[0]]))
    at = datetime(2026, 4, 1, tzinfo=UTC)
    land(store, "outcomes_0001", old[1], at)
    land(store, "outcomes_0002", new[1].head(200), at)
    read_log = lambda ids: read_predictions(url, live.PREDICTION_COLUMNS, request_ids=ids)  # noqa: E731

    def from_scratch() -> pl.DataFrame:
        whole = live.join_outcomes(read_predictions(url, live.PREDICTION_COLUMNS), stored_outcomes(store))
        return live.live_figures(whole, {"3": {"roc_auc": 0.7}}, resamples=50)

    live.update_joined(store, read_log, at)
    first = live.measure(store, {"3": {"roc_auc": 0.7}}, now=at, resamples=50)
    assert first.computed == ("3", "4") and first.kept == () and first.outcomes == 700
    assert first.figures.drop("computed_at", "inputs").equals(from_scratch())

    again = live.measure(store, {"3": {"roc_auc": 0.71}}, now=at + timedelta(hours=1), resamples=50)
    assert again.computed == () and again.kept == ("3", "4")
    assert again.figures.drop("test").equals(first.figures.drop("test"))  # computed_at too: as computed then
    assert again.figures.filter(pl.col("metric") == "roc_auc")["test"].to_list() == [0.71, None]
    assert again.periods.equals(first.periods)

    land(store, "outcomes_0003", new[1].tail(200), at)  # v4's other outcomes land: v3's figures stand
    live.update_joined(store, read_log, at + timedelta(hours=2))
    third = live.measure(store, {"3": {"roc_auc": 0.7}}, now=at + timedelta(hours=2), resamples=50)
    assert third.computed == ("4",) and third.kept == ("3",) and third.outcomes == 900
    assert third.figures.drop("computed_at", "inputs").equals(from_scratch())
    whole = live.read_joined(store)
    assert third.periods.equals(live.by_period(whole))
    assert live.measure(store, {}, now=at, resamples=60).computed == ("3", "4")  # other settings: computed again


def stored_outcomes(store) -> pl.DataFrame:
    from readmission_platform.lib.outcomes import OUTCOMES

    return store.query(f"SELECT request_id, readmitted_30d FROM {OUTCOMES} ORDER BY batch_id, line_number")


def test_figures_stored_by_the_version_before_are_widened_and_computed_again(store, tmp_path):
    from readmission_platform.lib.predictions import read_predictions

    url = f"sqlite:///{tmp_path / 'predictions.sqlite'}"
    predictions, outcomes = logged(300, "3", seed=3)
    log_predictions(url, predictions)
    at = datetime(2026, 4, 1, tzinfo=UTC)
    land(store, "outcomes_0001", outcomes, at)
    earlier = {k: v for k, v in live.LIVE_SCHEMA.items() if k != "inputs"}  # the table as the version before made it
    store.replace_table(live.LIVE_TABLE, earlier, pl.DataFrame([dict.fromkeys(earlier) | {"model_version": "3", "metric": "roc_auc"}], schema=earlier))
    live.update_joined(store, lambda ids: read_predictions(url, live.PREDICTION_COLUMNS, request_ids=ids), at)
    measured = live.measure(store, {}, now=at, resamples=30)
    assert measured.computed == ("3",) and list(store.columns(live.LIVE_TABLE)) == list(live.LIVE_SCHEMA)
    stored = store.query(f"SELECT * FROM {live.LIVE_TABLE}")
    assert stored.height == 7 and stored["estimate"].null_count() == 0 and stored["inputs"].n_unique() == 1
