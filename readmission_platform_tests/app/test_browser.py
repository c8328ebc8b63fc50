"""The app in a real browser: headless Chromium (Debian's), driven by Playwright, against a real `bentoml serve`."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import polars as pl
import pytest

from readmission_platform.app.server import running_app
from readmission_platform_tests.app.conftest import TOKEN
from readmission_platform_tests.serving.conftest import logged_once

pytestmark = pytest.mark.browser

CHROMIUM = Path("/usr/bin/chromium")
# Kept after the run (git-ignored): what the browser showed.
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"
WAIT_MS = 90_000


def test_a_clinician_fills_the_form_and_reads_the_risk_and_what_drove_it(app_service, tmp_path):
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing: `apt-get install chromium` (.ci/run does)", pytrace=False)
    from playwright.sync_api import expect, sync_playwright

    env = {"READMISSION_SERVICE_URL": app_service.url, "READMISSION_API_TOKEN": TOKEN,
           "READMISSION_HOME": str(app_service.settings.home)}  # fmt: skip
    with running_app(env, tmp_path / "app.log") as url, sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(url)
            predict = page.get_by_role("button", name="Predict", exact=True)
            predict.wait_for(timeout=WAIT_MS)
            inpatient = page.get_by_role("spinbutton", name="Inpatient stays, past year", exact=True)
            inpatient.fill("5")
            inpatient.press("Enter")
            diagnosis = page.get_by_role("textbox", name="Primary diagnosis (ICD-9)", exact=True)
            diagnosis.fill("486")
            diagnosis.press("Enter")
            expect(page.get_by_text("group: respiratory")).to_be_visible(timeout=WAIT_MS)
            predict.click()

            probability = page.get_by_test_id("stMetricValue").first
            expect(probability).to_have_text(re.compile(r"^\d{1,3}\.\d %$"), timeout=WAIT_MS)
            chart = page.get_by_test_id("stVegaLiteChart")
            expect(chart.locator("canvas, svg").first).to_be_visible(timeout=WAIT_MS)
            expect(page.get_by_text("What pushed the risk up and down")).to_be_visible()
            page.wait_for_timeout(1_000)  # the chart's bars are drawn after its canvas appears
            page.get_by_role("heading", name="Answer").evaluate("e => e.scrollIntoView({block: 'start'})")
            screenshot = tmp_path / "predict.png"
            page.screenshot(path=screenshot)
            shown = probability.inner_text()
        finally:
            browser.close()
    ARTIFACTS.mkdir(exist_ok=True)
    shutil.copyfile(screenshot, ARTIFACTS / "app-predict.png")
    assert screenshot.stat().st_size > 20_000

    # What the page showed is what the service logged for the encounter the form sent.
    form = (pl.col("endpoint") == "predict") & (pl.col("number_inpatient") == 5) & (pl.col("diag_1") == "486")
    logged = logged_once(app_service.settings.prediction_log_url, ["endpoint", "probability", "number_inpatient", "diag_1"],
                         lambda f: f.filter(form).height > 0, "the form's encounter")  # fmt: skip
    sent = logged.filter(form)
    assert sent.height == 1
    assert shown == f"{100 * sent['probability'][0]:.1f} %"
