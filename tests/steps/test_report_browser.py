"""The drift report a reviewer opens, rendered in a real browser (headless Chromium).

The three signals' Evidently reports are written as the monitor writes them: to the artifact
store and to an MLflow run under ``drift/``. Each is opened from the store and from MLflow's
copy; every signal's per-column table must render (each column's name on the page), and the
page must log no script error. A screenshot of each is kept in ``test-artifacts/``.
Skips, saying why, where Chromium cannot run; fails instead under CI (``.ci/run`` installs it).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tests import ci
from tests.browser import Browser, unavailable

REPO = Path(__file__).resolve().parents[2]
SHOTS = REPO / "test-artifacts"
pytestmark = [pytest.mark.integration]


def _frames(seed: int, shift: float) -> dict[str, pd.DataFrame]:
    rng = np.random.default_rng(seed)
    n, codes, err = 300, ["code_0", "code_1", "code_2"], "reconstruction_error"
    return {
        "raw": pd.DataFrame(rng.normal(shift, 1.0, (n, 4)), columns=[f"f{i}" for i in range(4)]),
        "codes": pd.DataFrame(rng.normal(shift, 1.0, (n, 3)), columns=codes),
        "reconstruction_error": pd.DataFrame({err: rng.gamma(2.0, 0.1 + shift, n)}),
    }


@pytest.fixture(scope="module")
def reports(tmp_path_factory):
    """The three reports in a store folder and in an MLflow run (a local store)."""
    reason = unavailable()
    if reason:
        ci.unavailable(f"the browser test cannot run: {reason}")
    from mlflow import MlflowClient

    from sae_pipeline.monitoring.drift import DriftPolicy, run_report

    tmp = tmp_path_factory.mktemp("browser")
    store = tmp / "artifacts" / "monitoring" / "checks" / "manual__browser"
    store.mkdir(parents=True)
    reference, current, policy = _frames(0, 0.0), _frames(1, 1.5), DriftPolicy()
    columns = {}
    for name in reference:
        snapshot, result = run_report(current[name], reference[name], policy, name)
        snapshot.save_html(str(store / f"{name}.html"))
        assert result["drifted_columns"] >= 1, name
        columns[name] = list(current[name].columns)
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    exp = client.create_experiment("sae-monitoring", artifact_location=str(tmp / "mlruns"))
    run_id = client.create_run(exp).info.run_id
    client.log_artifacts(run_id, str(store), artifact_path="drift")
    downloaded = Path(client.download_artifacts(run_id, "drift", str(tmp / "from-mlflow")))
    return {"store": store, "mlflow": downloaded, "columns": columns}


@pytest.fixture(scope="module")
def browser(reports):
    """One Chromium for every page of the module."""
    with Browser(timeout=60) as b:
        yield b


@pytest.mark.parametrize("where", ["store", "mlflow"])
@pytest.mark.parametrize("signal", ["raw", "codes", "reconstruction_error"])
def test_the_drift_report_renders_every_signals_table_without_script_errors(
    reports, browser, where, signal
):
    page = reports[where] / f"{signal}.html"
    assert page.is_file(), page
    browser.console_errors.clear()
    browser.exceptions.clear()
    browser.open(page.as_uri(), settle=1.0)
    # The report is drawn by its scripts: wait for the per-column table to appear.
    text = ""
    for _ in range(40):
        text = browser.evaluate("document.body ? document.body.innerText : ''") or ""
        if all(c in text for c in reports["columns"][signal]):
            break
        time.sleep(0.25)
    shot = browser.screenshot(SHOTS / f"drift-report-{where}-{signal}.png")
    assert shot.stat().st_size > 10_000, "an empty screenshot"
    missing = [c for c in reports["columns"][signal] if c not in text]
    assert not missing, f"columns missing from the rendered {signal} report: {missing}"
    assert "Drifted Columns" in text and "Data Drift Summary" in text
    assert browser.exceptions == [], browser.exceptions
    assert browser.console_errors == [], browser.console_errors
