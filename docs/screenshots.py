"""Take the README's MLflow screenshots of a study in a real headless browser.

Serves a *copy* of the study's MLflow database with `mlflow server`, opens the study's
view (:mod:`study.mlflow_view`) in headless Chromium and saves the runs table and the
chart view as PNGs. Needs selenium, which is no project dependency; use a separate venv:

    python3 -m venv /tmp/shotvenv && /tmp/shotvenv/bin/pip install selenium
    /tmp/shotvenv/bin/python docs/screenshots.py mlflow.db docs/img \
        --mlflow /path/to/project/venv/bin/mlflow

The copy gets the view tag (as a study run today writes it), so a study tracked before the
view existed shows it too; the original database is only read.
"""
from __future__ import annotations

import argparse
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from selenium import webdriver
from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions as EC
from selenium.webdriver.support.ui import WebDriverWait

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from study.mlflow_view import VIEW_TAG, view_json, view_url  # noqa: E402
from study.tracking import ROLE_TAG  # noqa: E402


def copy_db(src: Path, dst: Path, study: str) -> str:
    """Copy the database consistently (SQLite backup), (re)write the view tag for the trials
    it holds; return the experiment id."""
    with sqlite3.connect(f"{src.resolve().as_uri()}?mode=ro", uri=True) as a, sqlite3.connect(dst) as b:
        a.backup(b)
        row = b.execute("select experiment_id from experiments where name = ?", (study,)).fetchone()
        if row is None:
            raise SystemExit(f"error: {src}: no experiment named `{study}`")
        trials: dict[str, dict[str, str]] = {}
        for run, key, value in b.execute(
                "select t.run_uuid, t.key, t.value from tags t join runs r on r.run_uuid = t.run_uuid "
                "where r.experiment_id = ? and t.run_uuid in (select run_uuid from tags where key = ? and value = 'trial')",
                (row[0], ROLE_TAG)):
            trials.setdefault(run, {})[key] = value
        b.execute("delete from experiment_tags where experiment_id = ? and key = ?", (row[0], VIEW_TAG))
        b.execute("insert into experiment_tags (key, value, experiment_id) values (?, ?, ?)",
                  (VIEW_TAG, view_json(list(trials.values())), row[0]))
    return str(row[0])


def serve(mlflow: str, db: Path, port: int) -> subprocess.Popen:
    proc = subprocess.Popen([mlflow, "server", "--backend-store-uri", f"sqlite:///{db}", "--host", "127.0.0.1",
                             "--port", str(port), "--workers", "1"], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    for _ in range(240):
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                return proc
        except OSError:
            time.sleep(1)
    proc.terminate()
    raise SystemExit("error: mlflow server did not start in 240 s")


def browser() -> webdriver.Chrome:
    opts = webdriver.ChromeOptions()
    opts.binary_location = "/usr/bin/chromium"
    for arg in ("--headless=new", "--window-size=1600,1400", "--no-sandbox", "--disable-gpu",
                "--hide-scrollbars", "--force-device-scale-factor=1"):
        opts.add_argument(arg)
    return webdriver.Chrome(service=webdriver.ChromeService("/usr/bin/chromedriver"), options=opts)


# Panels that cover the view: the assistant chat and the "shared view" banner; the sidebar
# (its toggle is remembered, so it is pressed once).
CLOSE = ("mlflow.assistant.chat_panel.close", "mlflow.experiment_page.shared_view.dismiss")
SIDEBAR = "mlflow_header.toggle_sidebar_button"


def shoot(driver: webdriver.Chrome, url: str, ready: str, png: Path, width: int, height: int,
          close: tuple[str, ...] = CLOSE) -> None:
    """Open `url` in a `width` x `height` page, wait for `ready` (a CSS selector), close the
    panels that cover the view, save a PNG."""
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                           {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False})
    driver.get(url)
    WebDriverWait(driver, 240).until(EC.presence_of_element_located((By.CSS_SELECTOR, ready)))
    time.sleep(8)  # charts and aggregated rows render after the first rows
    for component in close:
        for button in driver.find_elements(By.CSS_SELECTOR, f"button[data-component-id='{component}']"):
            button.click()
    time.sleep(3)
    driver.save_screenshot(str(png))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("db", type=Path, help="the study's mlflow.db (read only)")
    ap.add_argument("out", type=Path, help="folder for mlflow_runs.png and mlflow_lambda_sweep.png")
    ap.add_argument("--study", default="default")
    ap.add_argument("--mlflow", default="mlflow", help="the mlflow executable (the project's venv)")
    ap.add_argument("--port", type=int, default=5055)
    ap.add_argument("--width", type=int, default=1600, help="page width in pixels")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        db = Path(tmp) / "mlflow.db"
        experiment = copy_db(args.db, db, args.study)
        server = serve(args.mlflow, db, args.port)
        driver = browser()
        try:
            ui = f"http://127.0.0.1:{args.port}"
            shoot(driver, view_url(ui, experiment), ".ag-row", args.out / "mlflow_runs.png", args.width, 560,
                  (*CLOSE, SIDEBAR))
            shoot(driver, view_url(ui, experiment, charts=True), ".js-plotly-plot", args.out / "mlflow_lambda_sweep.png",
                  args.width, 1640)
        finally:
            driver.quit()
            server.terminate()
            server.wait(30)
    print(f"wrote {args.out / 'mlflow_runs.png'} and {args.out / 'mlflow_lambda_sweep.png'}")


if __name__ == "__main__":
    main()
