"""Running DAG files in this process with ``dag.test()`` on an embedded Airflow (SQLite).

The demo and the tests use these; a deployment runs the same DAG files under a scheduler.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]


def airflow_env(home: Path, dags_folder: Path) -> dict[str, str]:
    """Environment for an embedded Airflow: SQLite metadata, no examples, our DAG folder."""
    return {
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__CORE__DAGS_FOLDER": str(dags_folder),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{home / 'airflow.db'}",
        "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
        "AIRFLOW__LOGGING__LOGGING_LEVEL": "WARNING",
        "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
    }


def prepare_airflow(home: Path, dags_folder: Path = REPO / "dags") -> None:
    """Point this process at an embedded Airflow and migrate its SQLite database."""
    home.mkdir(parents=True, exist_ok=True)
    os.environ.update(airflow_env(home, dags_folder))
    subprocess.run(
        [sys.executable, "-m", "airflow", "db", "migrate"],
        check=True,
        env=os.environ.copy(),
        stdout=subprocess.DEVNULL,
    )


def load_dag_module(dag_file: Path):
    """Import a DAG file as a module (DAG files are not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"_sae_dag_{dag_file.stem}", dag_file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_dag_test(
    dag_file: Path, conf: dict[str, Any] | None = None, dag_attr: str = "training_dag"
):
    """Import a DAG file and run it with ``dag.test()``; return the finished DagRun."""
    return getattr(load_dag_module(dag_file), dag_attr).test(run_conf=conf or {})


def task_results(dag_run) -> dict[str, Any]:
    """The return values (XCom) of every successful task of a finished run."""
    from airflow.models.taskinstance import TaskInstance  # noqa: F401  (session setup)
    from airflow.utils.session import create_session

    out = {}
    with create_session() as session:
        from airflow.models.xcom import XComModel

        rows = session.query(XComModel).filter(
            XComModel.dag_id == dag_run.dag_id, XComModel.run_id == dag_run.run_id
        )
        for row in rows:
            if row.key == "return_value":
                value = row.value
                out[row.task_id] = json.loads(value) if isinstance(value, str) else value
    return out
