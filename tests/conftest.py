"""Shared fixtures. Airflow is pointed at a throwaway home before anything imports it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# Helpers that assert, outside test files: pytest's assertion messages there too.
pytest.register_assert_rewrite("tests.gate_check")

# Tiny settings for pipeline runs in tests: real training, seconds not minutes.
TINY = {
    "model.hidden_dims": [16, 4],
    "training.pretrain.epochs": 2,
    "training.finetune.epochs": 2,
}


HOME_ENV = "SAE_TEST_AIRFLOW_HOME"


def pytest_configure(config):
    # A pytest session started inside another (mutmut's forked workers run pytest.main again,
    # and leave with os._exit, past pytest_unconfigure) shares the outer session's home; only
    # the session that made the folder removes it.
    inherited = os.environ.get(HOME_ENV, "")
    if inherited and Path(inherited).is_dir():
        home = Path(inherited)
    else:
        home = Path(tempfile.mkdtemp(prefix="sae-airflow-"))
        os.environ[HOME_ENV] = str(home)
        config._sae_airflow_home = home
    from sae_pipeline.demo.airflow_run import airflow_env

    os.environ.update(airflow_env(home, REPO / "dags"))
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    os.environ.pop("SAE_CONFIG", None)


def pytest_unconfigure(config):
    """The throwaway Airflow home goes with the session (no ``sae-airflow-*`` left in /tmp)."""
    home = getattr(config, "_sae_airflow_home", None)
    if home is not None:
        shutil.rmtree(home, ignore_errors=True)
        os.environ.pop(HOME_ENV, None)


@pytest.fixture(autouse=True)
def _isolated_mlflow_uris():
    """Each test starts and ends with MLflow's process-wide URIs unset.

    Steps call ``mlflow.set_tracking_uri`` / ``set_registry_uri`` in-process (as a task does),
    and MLflow keeps both in module globals and exports them as environment variables; left
    behind, a later test that names its server through ``MLFLOW_TRACKING_URI`` would still
    read the registry of an earlier test's SQLite store.
    """
    yield
    for var in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"):
        os.environ.pop(var, None)
    if "mlflow" in sys.modules:
        from mlflow.tracking._model_registry import utils as registry_utils
        from mlflow.tracking._tracking_service import utils as tracking_utils

        registry_utils._registry_uri = None
        tracking_utils._tracking_uri = None


MLFLOW_DEFAULTS = ("mlflow.db", "mlruns")  # MLflow's own store and artifacts, in the cwd


@pytest.fixture(autouse=True)
def _no_mlflow_defaults_in_cwd():
    """A test that lets MLflow fall back on its defaults fails, and what it left is removed.

    With no tracking URI set, MLflow 3 opens ``sqlite:///mlflow.db`` in the current folder, and
    a store's default experiment keeps its artifacts in ``./mlruns``: a test (or the code it
    runs) that used them read or wrote a store nobody named.
    """
    try:
        cwd = Path.cwd()
    except OSError:  # the folder is gone (a test removed it): nothing there to compare
        yield
        return
    before = {name for name in MLFLOW_DEFAULTS if (cwd / name).exists()}
    yield
    left = [name for name in MLFLOW_DEFAULTS if (cwd / name).exists() and name not in before]
    for name in left:
        path = cwd / name
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    assert not left, f"the test left MLflow's default store in {cwd}: {left}; name a tracking URI"


@pytest.fixture(scope="session")
def airflow_db():
    """A migrated SQLite metadata database for dag.test()."""
    subprocess.run(
        [sys.executable, "-m", "airflow", "db", "migrate"],
        check=True,
        stdout=subprocess.DEVNULL,
        env=os.environ.copy(),
    )
    return os.environ["AIRFLOW_HOME"]


@pytest.fixture
def store(tmp_path):
    """Overrides that put artifacts and a SQLite MLflow store under a fresh folder."""
    root = tmp_path / "artifacts"
    return {
        "artifacts_root": str(root),
        "registry.tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}",
    }
