"""Every page of the app under Streamlit's AppTest, against a real `bentoml serve` with a token."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

import httpx
import polars as pl
import pytest
from streamlit.testing.v1 import AppTest

from readmission_platform.lib.outcomes import OUTCOME_SCHEMA, OUTCOMES
from readmission_platform.lib.predictions import read_predictions
from readmission_platform.lib.warehouse import open_warehouse
from readmission_platform.serving.model import SMOKE_ENCOUNTERS
from readmission_platform.serving.server import free_port
from readmission_platform.app.server import ENTRY
from readmission_platform_tests.app.conftest import TOKEN
from readmission_platform_tests.serving.conftest import logged_once

TIMEOUT = 60


def started(page: str | None = None) -> AppTest:
    app = AppTest.from_file(str(ENTRY), default_timeout=TIMEOUT)
    app.run()
    if page is not None:
        app.switch_page(page).run()
    assert not app.exception, app.exception
    return app


def widget(app: AppTest, kind: str, key: str):
    (found,) = [w for w in getattr(app, kind) if w.key == key]
    return found


def texts(app: AppTest) -> str:
    parts = [e.value for kind in ("markdown", "caption", "error", "warning", "info", "success") for e in app.get(kind)]
    return "\n".join(str(p) for p in parts)


def test_predict_shows_the_services_probability_band_threshold_and_explanation(app_env):
    app = started()
    # The service declares patient_id in its contract, so the page offers it.
    assert widget(app, "text_input", "patient_id").label == "Patient identifier (optional)"
    widget(app, "number_input", "field:number_inpatient").set_value(4)
    widget(app, "text_input", "field:diag_1").set_value("428")
    widget(app, "selectbox", "field:insulin").set_value("Up")
    app.run()
    assert "group: circulatory" in texts(app)
    widget(app, "button", "predict").click()
    app.run()
    assert not app.exception, app.exception
    assert not app.error and not app.warning, [e.value for e in [*app.error, *app.warning]]

    answer = app.session_state["answer"]
    request = answer["request"]
    assert request["number_inpatient"] == 4 and request["diag_1"] == "428" and request["insulin"] == "Up"
    # The same encounter sent straight to the service gets the probability the page shows.
    direct = httpx.post(f"{app_env.url}/predict", json={k: v for k, v in request.items() if k != "request_id"},
                        headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30).json()  # fmt: skip
    shown = {m.label: m.value for m in app.metric}
    assert shown["Probability of readmission within 30 days"] == f"{100 * direct['probability']:.1f} %"
    assert shown["Risk band"] == direct["risk_band"]
    assert shown["Flag threshold"] == f"{100 * direct['threshold']:.1f} %"
    assert f"version {app_env.version}" in texts(app)
    assert f"{direct['risk_band'].capitalize()} risk" in texts(app)

    assert len(app.get("vega_lite_chart")) == 1
    pushes = app.dataframe[0].value
    assert 0 < len(pushes) <= 12 and set(pushes["direction"]) <= {"raises the risk", "lowers the risk"}
    # The page's request to /predict and to /explain, both logged under the request id the page made.
    logged = logged_once(app_env.settings.prediction_log_url, ["request_id", "endpoint"],
                         lambda f: f.filter(pl.col("request_id") == request["request_id"]).height >= 2, "the page's two requests")  # fmt: skip
    assert sorted(logged.filter(pl.col("request_id") == request["request_id"])["endpoint"]) == ["explain", "predict"]


def test_the_app_says_plainly_when_the_token_is_wrong_or_the_service_is_down(app_env, monkeypatch):
    monkeypatch.setenv("READMISSION_API_TOKEN", "not-the-token")
    app = started()
    widget(app, "button", "predict").click()
    app.run()
    assert "refused the app's token" in app.error[0].value and "READMISSION_API_TOKEN" in app.error[0].value

    monkeypatch.setenv("READMISSION_SERVICE_URL", f"http://127.0.0.1:{free_port()}")
    app = started("pages/model.py")
    assert "does not answer" in app.error[0].value and "readmission serve" in app.error[0].value

    monkeypatch.setenv("READMISSION_SERVICE_URL", "http://[::1")
    app = started()
    widget(app, "button", "predict").click()
    app.run()
    assert not app.exception, app.exception
    assert "READMISSION_SERVICE_URL 'http://[::1' is not a URL the app can call" in app.error[0].value


def _export(full_source_bytes: bytes, rows: int) -> bytes:
    """The data set's header and its first `rows` encounters, as the hospital system exports them."""
    return b"".join(full_source_bytes.splitlines(keepends=True)[: rows + 1])


def test_batch_checks_each_row_scores_the_valid_ones_and_gives_the_file_back(app_env, full_source_bytes):
    lines = _export(full_source_bytes, 6).decode().splitlines()
    header = lines[0].split(",")
    bad = lines[3].split(",")
    bad[header.index("age")] = "[110-120)"
    lines[3] = ",".join(bad)
    content = ("\n".join(lines) + "\n").encode()

    app = started("pages/batch.py")
    app.get("file_uploader")[0].set_value(("export.csv", content, "text/csv"))
    app.run()
    assert not app.exception, app.exception
    said = texts(app)
    assert "6 rows: 5 valid, 1 with a problem" in said
    problems = app.dataframe[0].value["problem"].tolist()
    assert problems == ["line 4: 'age' holds '[110-120)'; expected one of [0-10), [10-20), [20-30), [30-40), [40-50), "
                        "[50-60), [60-70), [70-80), [80-90), [90-100)"]  # fmt: skip
    url = app_env.settings.prediction_log_url
    before = (read_predictions(url, ["endpoint"])["endpoint"] == "predict_batch").sum()  # the service is the session's
    widget(app, "button", "score").click()
    app.run()
    assert not app.exception, app.exception
    name, scored = app.session_state["scored"]
    assert name == "export.csv" and scored.height == 6
    assert scored["encounter_id"].to_list() == [line.split(",")[0] for line in lines[1:]]
    assert scored["probability"].is_null().to_list() == [False, False, True, False, False, False]
    assert scored["problem"][2].startswith("line 4: 'age'")
    assert set(scored["model_version"].drop_nulls()) == {app_env.version}
    assert "5 encounters scored" in texts(app)
    # What was sent holds no identifier: the log's rows have the service's own request ids.
    logged = logged_once(url, ["request_id", "endpoint"], lambda f: (f["endpoint"] == "predict_batch").sum() == before + 5,
                         "the five scored encounters")  # fmt: skip
    assert not set(logged["request_id"]) & set(scored["encounter_id"].to_list())


def test_batch_refuses_a_file_without_the_data_sets_columns(app_env):
    app = started("pages/batch.py")
    app.get("file_uploader")[0].set_value(("notes.csv", b"patient,note\n1,fine\n", "text/csv"))
    app.run()
    assert "has no column race, gender, age" in app.error[0].value


def test_model_page_shows_the_card_of_the_version_serving(app_env):
    app = started("pages/model.py")
    assert not app.error, [e.value for e in app.error]
    assert f"version {app_env.version}" in app.subheader[0].value
    facts = app.table[0].value
    assert "hist_gradient_boosting" in facts["value"].tolist()
    metrics = app.dataframe[0].value.set_index("metric")
    assert metrics.loc["roc_auc", "test"] == "0.660"  # as `register` logged it
    assert "Not reported: this service's /model has no `calibration`" in texts(app)


def test_history_lists_predictions_without_identifiers_with_outcomes_where_known(app_env):
    request_id = f"history-{uuid.uuid4().hex}"
    answer = httpx.post(f"{app_env.url}/predict", json=SMOKE_ENCOUNTERS[0] | {"request_id": request_id},
                        headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30).json()  # fmt: skip
    known = pl.DataFrame(
        [{"batch_id": "outcomes_0001", "request_id": request_id, "readmitted_30d": True,
          "known_at": datetime(2026, 12, 1, tzinfo=UTC), "source_file": "outcomes_0001.csv", "line_number": 2,
          "ingested_at": datetime(2026, 12, 1, tzinfo=UTC)}],
        schema=OUTCOME_SCHEMA,
    )  # fmt: skip
    open_warehouse(app_env.settings.warehouse_url).append(OUTCOMES, OUTCOME_SCHEMA, known)

    app = started("pages/history.py")
    assert not app.error, [e.value for e in app.error]
    rows = app.dataframe[0].value
    assert "request_id" not in rows.columns and "patient_nbr" not in rows.columns
    assert "readmitted within 30 days" in rows["outcome"].tolist()
    band = answer["risk_band"]
    app.multiselect[1].set_value([band]).run()
    assert set(app.dataframe[0].value["risk_band"]) == {band}
    app.multiselect[0].set_value([app_env.version]).run()
    assert set(app.dataframe[0].value["model_version"]) == {app_env.version}
