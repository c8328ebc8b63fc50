"""Make the README's pictures from a demo instance: the app's Predict page with an answer, and the Dagster asset graph.

    READMISSION_HOME=<a home `make demo` filled> .venv/bin/python docs/capture_screenshots.py [app] [graph]

Starts `bentoml serve` on the home's latest Bento (or the repository's service), the app on it and the Dagster UI's
webserver (no daemon: the pictures need none, and a demo still running has its own), each on a free port, and drives
Debian's Chromium (/usr/bin/chromium) through Playwright. Writes docs/images/app-predict.png and
docs/images/dagster-asset-graph.png.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from playwright.sync_api import TimeoutError as PlaywrightTimeout
from playwright.sync_api import expect, sync_playwright

from readmission_platform.app.server import running_app
from readmission_platform.cli.instance import REPO_ROOT, prepare_dagster_home
from readmission_platform.serving.server import BENTO, free_port, running_server, stop, wait_until_answering
from readmission_platform.settings import Settings

CHROMIUM = "/usr/bin/chromium"
IMAGES = Path(__file__).resolve().parent / "images"
WAIT_MS = 120_000


def capture_app(browser, url: str) -> None:
    page = browser.new_page(viewport={"width": 1500, "height": 1150})
    page.goto(url)
    predict = page.get_by_role("button", name="Predict", exact=True)
    predict.wait_for(timeout=WAIT_MS)
    for label, value in (("Inpatient stays, past year", "3"), ("Emergency visits, past year", "1")):
        field = page.get_by_role("spinbutton", name=label, exact=True)
        field.fill(value)
        field.press("Enter")
    predict.click()
    expect(page.get_by_test_id("stVegaLiteChart").locator("canvas, svg").first).to_be_visible(timeout=WAIT_MS)
    page.wait_for_timeout(1_500)
    # Streamlit scrolls its main section itself: the answer is brought to the top of the window, not the page grown.
    page.get_by_role("heading", name="Answer").evaluate("e => e.scrollIntoView({block: 'start'})")
    page.wait_for_timeout(500)
    page.screenshot(path=IMAGES / "app-predict.png")


def capture_asset_graph(browser, url: str) -> None:
    page = browser.new_page(viewport={"width": 3000, "height": 1500})
    page.goto(f"{url}/asset-groups")
    page.get_by_text("Global asset lineage").wait_for(timeout=3 * WAIT_MS)  # the code location loads first
    page.wait_for_timeout(3_000)
    skip = page.get_by_role("button", name="Skip")
    if skip.count():
        skip.click()  # the community sign-up a new Dagster home shows once
    # The graph opens with each stage's group collapsed; a click on a group's node opens it. The UI keeps which groups
    # are open, and a page loaded again fits the whole graph in the window, so each group is opened on a fresh load:
    # one opened earlier can push the next out of view.
    for group in ("ingestion", "history", "preparation", "monitoring", "outcomes", "training", "promotion", "serving"):
        try:
            page.get_by_text(group, exact=True).last.click(timeout=5_000)
        except PlaywrightTimeout:
            print(f"the group {group} was not in view: left closed in the picture", file=sys.stderr)
        page.wait_for_timeout(1_000)
        page.reload()
        page.get_by_text("Global asset lineage").wait_for(timeout=WAIT_MS)
        page.wait_for_timeout(4_000)
    page.wait_for_timeout(4_000)
    page.screenshot(path=IMAGES / "dagster-asset-graph.png")


def main() -> int:
    settings = Settings.from_env()
    prepare_dagster_home(settings)
    IMAGES.mkdir(exist_ok=True)
    only = set(sys.argv[1:]) or {"app", "graph"}
    logs = settings.home / "logs"
    bento = BENTO if (settings.bentoml_home / "bentos" / BENTO.split(":")[0]).is_dir() else None
    port = free_port()
    webserver_log = logs / "capture-webserver.log"
    with open(webserver_log, "wb") as output:
        webserver = subprocess.Popen(
            [str(Path(sys.executable).with_name("dagster-webserver")), "-w", str(REPO_ROOT / "workspace.yaml"),
             "-h", "127.0.0.1", "-p", str(port)],
            cwd=REPO_ROOT, stdout=output, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    try:
        with (
            running_server(settings, bento=bento, log_path=logs / "capture-serve.log") as service,
            running_app({"READMISSION_SERVICE_URL": service, "READMISSION_HOME": str(settings.home)},
                        logs / "capture-app.log") as app,  # fmt: skip
            sync_playwright() as playwright,
        ):
            wait_until_answering(webserver, f"http://127.0.0.1:{port}/server_info", "dagster-webserver", 180, webserver_log)
            browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True)
            try:
                if "app" in only:
                    capture_app(browser, app)
                if "graph" in only:
                    capture_asset_graph(browser, f"http://127.0.0.1:{port}")
            finally:
                browser.close()
    finally:
        stop(webserver)
    print(f"wrote {', '.join(sorted(only))} into {IMAGES}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
