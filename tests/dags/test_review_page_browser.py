"""The drift review's page in the real Airflow UI, opened in headless Chromium (issue 23 item 6).

Airflow (api-server, scheduler, dag-processor; LocalExecutor on SQLite), an MLflow server and
a plain HTTP server over the artifact store run on this machine. A one-task DAG feeds the real
``DriftReview`` operator the request ``steps.review.request`` builds for a check whose reports
sit in the store and in an MLflow run, with ``SAE_MLFLOW_PUBLIC_URL`` and
``SAE_ARTIFACTS_PUBLIC_URL`` set as a deployment sets them. Chromium opens the task's
*Required actions* page: every report link must render as an anchor with a non-empty href,
and each must answer 200 from the running servers. Before, the page held ``file://`` and
``runs:/`` links, which Airflow's markdown renders as ``href=""``.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from tests import ci
from tests.browser import Browser, unavailable
from tests.distributed_topology import _stop_all, free_port, http, wait_for

REPO = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.system, pytest.mark.integration, pytest.mark.slow]
DAG_ID = "sae_review_page"
RUN_ID = "manual__review_page"
SIGNALS = ("raw", "codes", "reconstruction_error")

DAG_FILE = f"""
import datetime, importlib.util, json, os
from pathlib import Path

import pendulum
from airflow.sdk import dag, task

_path = {str(REPO / "dags" / "sae_drift_monitor.py")!r}
_spec = importlib.util.spec_from_file_location("_drift_dag", _path)
_drift = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_drift)


@dag(dag_id={DAG_ID!r}, schedule=None, start_date=pendulum.datetime(2026, 1, 1, tz="UTC"))
def review_page():
    @task
    def review_request():
        return json.loads(Path(os.environ["SAE_TEST_REVIEW_REQUEST"]).read_text())

    review_request() >> _drift.DriftReview(
        task_id="review", subject="Drift review", options=["retrain", "accept", "dismiss"],
        defaults="dismiss", response_timeout=datetime.timedelta(hours=1), retries=0,
    )


review_page()
"""


def _reports(tmp: Path, mlflow_url: str) -> tuple[dict, dict]:
    """A check's reports in the store and in an MLflow run on the server: (ctx, summary)."""
    from mlflow import MlflowClient

    from sae_pipeline import storage
    from sae_pipeline.registry.champion import ModelRef
    from sae_pipeline.steps import monitoring

    root = tmp / "artifacts"
    out = root / "monitoring" / "checks" / RUN_ID
    out.mkdir(parents=True)
    for name in SIGNALS:
        (out / f"{name}.html").write_text(f"<html><body><h1>{name} report</h1></body></html>")
    client = MlflowClient(tracking_uri=mlflow_url)
    exp = client.create_experiment("sae-monitoring")
    run_id = client.create_run(exp).info.run_id
    client.log_artifacts(run_id, str(out), artifact_path="drift")
    summary = {
        "batch_key": "batch_shifted-1613b33dec",
        "model_name": "sae-digits-encoder",
        "model_version": "1",
        "decision": "retrain",
        "reason": "drift in raw, codes",
        "retrain_triggered": True,
        "report_dir": storage.join(str(root), "monitoring", "checks", RUN_ID),
        "mlflow_run_id": run_id,
        "drift_share": dict.fromkeys(SIGNALS, 0.9),
    }
    storage.write_json(str(out / "summary.json"), {**summary, "summary": "**retrain**: drift"})
    ref = ModelRef("sae-digits-encoder", "1", "r", "k", "http://mlflow:5000", str(root))
    ctx = {
        "run_id": RUN_ID,
        "run_key": RUN_ID,
        "artifacts_root": str(root),
        "tracking_uri": "http://mlflow:5000",  # the workers' address: never a reviewer's link
        "model": ref.to_dict(),
        "batch": {"files": [], "key": summary["batch_key"]},
    }
    ctx = monitoring.prepare(ctx, None, {"review.retrain": "required"})
    return ctx, summary


class Servers:
    """MLflow, a static server over the store, and Airflow, each in its own process group."""

    def __init__(self, tmp: Path):
        self.tmp, self.procs, self.logs = tmp, {}, tmp / "logs"
        self.logs.mkdir()
        self.ports = {k: free_port() for k in ("mlflow", "files", "api")}
        self.mlflow_url = f"http://127.0.0.1:{self.ports['mlflow']}"
        self.files_url = f"http://127.0.0.1:{self.ports['files']}"
        self.api_url = f"http://127.0.0.1:{self.ports['api']}"

    def spawn(self, name: str, cmd: list[str], env: dict[str, str] | None = None) -> None:
        log = open(self.logs / f"{name}.log", "ab")  # noqa: SIM115  (closed with the process)
        self.procs[name] = subprocess.Popen(
            cmd,
            env=env or os.environ.copy(),
            cwd=self.tmp,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()

    def airflow_env(self, request_file: Path) -> dict[str, str]:
        home = self.tmp / "airflow"
        dags = self.tmp / "dags"
        dags.mkdir()
        (dags / "review_page.py").write_text(DAG_FILE)
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("AIRFLOW__", "AIRFLOW_CTX", "MLFLOW_", "SAE_"))
        }
        env.update(
            {
                "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
                "PYTHONPATH": str(REPO),
                "AIRFLOW_HOME": str(home),
                "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
                "AIRFLOW__CORE__PARALLELISM": "2",
                "AIRFLOW__CORE__DAGS_FOLDER": str(dags),
                "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
                "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "False",
                "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS": "True",
                "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{self.api_url}/execution/",
                "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{home / 'airflow.db'}",
                "AIRFLOW__API_AUTH__JWT_SECRET": secrets.token_urlsafe(32),
                "AIRFLOW__API__SECRET_KEY": secrets.token_urlsafe(32),
                "AIRFLOW__SCHEDULER__USE_JOB_SCHEDULE": "False",
                "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "5",
                "SAE_TEST_REVIEW_REQUEST": str(request_file),
            }
        )
        return env

    def start_mlflow(self) -> None:
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        mlflow = str(Path(sys.executable).parent / "mlflow")
        self.spawn(
            "mlflow",
            [
                mlflow,
                "server",
                "--backend-store-uri",
                f"sqlite:///{self.tmp / 'mlflow.db'}",
                "--serve-artifacts",
                "--artifacts-destination",
                str(self.tmp / "mlartifacts"),
                "--host",
                "127.0.0.1",
                "--port",
                str(self.ports["mlflow"]),
                "--workers",
                "1",
            ],
            env,
        )
        self.spawn(
            "files",
            [
                sys.executable,
                "-m",
                "http.server",
                str(self.ports["files"]),
                "--bind",
                "127.0.0.1",
                "--directory",
                str(self.tmp / "artifacts"),
            ],
        )

        def up():
            try:
                return urllib.request.urlopen(f"{self.mlflow_url}/health", timeout=5).status == 200
            except OSError:
                return False

        wait_for("the MLflow server", up, 180, interval=1)

    def start_airflow(self, env: dict[str, str]) -> None:
        airflow = [sys.executable, "-m", "airflow"]
        migrate = subprocess.run(
            [*airflow, "db", "migrate"], env=env, capture_output=True, text=True, timeout=600
        )
        assert migrate.returncode == 0, migrate.stderr[-3000:]
        api = ["api-server", "--host", "127.0.0.1", "--port", str(self.ports["api"])]
        self.spawn("api-server", [*airflow, *api, "--workers", "1"], env)
        self.spawn("scheduler", [*airflow, "scheduler"], env)
        self.spawn("dag-processor", [*airflow, "dag-processor"], env)

        def parsed():
            try:
                return http("GET", f"{self.api_url}/api/v2/dags/{DAG_ID}")
            except Exception:
                return None

        wait_for("the api-server to serve the parsed review DAG", parsed, 300, interval=2)

    def stop(self) -> None:
        _stop_all(list(self.procs.values()))

    def tail(self) -> str:
        return "\n".join(
            f"--- {f.name}\n{f.read_text(errors='replace')[-2500:]}" for f in self.logs.iterdir()
        )


@pytest.fixture(scope="module")
def review_page(tmp_path_factory):
    reason = unavailable()
    if reason:
        ci.unavailable(f"the browser test cannot run: {reason}")
    from sae_pipeline.steps import review

    tmp = tmp_path_factory.mktemp("review-page")
    servers = Servers(tmp)
    mp = pytest.MonkeyPatch()
    try:
        servers.start_mlflow()
        mp.setenv(review.MLFLOW_PUBLIC_URL, servers.mlflow_url)
        mp.setenv(review.ARTIFACTS_PUBLIC_URL, servers.files_url)
        ctx, summary = _reports(tmp, servers.mlflow_url)
        asked = review.request(ctx, summary)
        assert asked["required"]
        request_file = tmp / "request.json"
        request_file.write_text(json.dumps(asked))
        servers.start_airflow(servers.airflow_env(request_file))
        path = f"/api/v2/dags/{DAG_ID}/dagRuns"
        http("POST", servers.api_url + path, {"dag_run_id": RUN_ID, "logical_date": None})
        ti = f"{servers.api_url}{path}/{RUN_ID}/taskInstances/review"

        def waiting():
            state = http("GET", ti)["state"]
            if state in ("failed", "upstream_failed", "success", "skipped"):
                raise AssertionError(f"the review task ended {state}\n{servers.tail()}")
            return state == "awaiting_input"

        wait_for("the review task to wait for a person", waiting, 300, interval=2)
        yield {"servers": servers, "links": review.report_links(ctx, summary)}
    except BaseException:
        print(servers.tail())
        raise
    finally:
        mp.undo()
        servers.stop()


def _anchors(browser: Browser) -> list[dict[str, str]]:
    return browser.evaluate(
        "Array.from(document.querySelectorAll('a')).map(a => ({text: a.textContent.trim(),"
        " href: a.getAttribute('href') || ''}))"
    )


def test_the_review_pages_links_render_and_answer_200(review_page):
    servers, links = review_page["servers"], review_page["links"]
    assert len(links) == 2 * len(SIGNALS) + 1  # the store's and MLflow's reports, the run
    page = f"{servers.api_url}/dags/{DAG_ID}/runs/{RUN_ID}/tasks/review/required_actions"
    with Browser(timeout=90) as browser:
        browser.open(f"{servers.api_url}/auth/token/login?next={page}", settle=3.0)

        def rendered():
            found = {a["text"]: a["href"] for a in _anchors(browser)}
            return found if set(links) <= set(found) else None

        try:
            found = wait_for("the review body's links on the page", rendered, 120, interval=2)
        except TimeoutError:
            shot = browser.screenshot(REPO / "test-artifacts" / "review-page.png")
            raise AssertionError(f"links missing; page: {_anchors(browser)}; {shot}") from None
        browser.screenshot(REPO / "test-artifacts" / "review-page.png")
    for name, url in links.items():
        assert found[name] == url, name  # non-empty, and what the step built
        with urllib.request.urlopen(url, timeout=30) as answer:  # the running servers
            assert answer.status == 200, (name, url)
    report_hrefs = [href for text, href in found.items() if "report" in text or "MLflow" in text]
    assert all(h.startswith("http") for h in report_hrefs), report_hrefs
