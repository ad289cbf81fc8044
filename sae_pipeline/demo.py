"""``make demo``: run the training DAG through Airflow on embedded defaults and summarise it.

Airflow's metadata goes to SQLite under ``.airflow/``, MLflow to a SQLite store under
``artifacts/mlflow/``, data comes from scikit-learn's digits. Nothing needs a server.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


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


def summarize(results: dict[str, Any]) -> dict[str, Any]:
    """The demo summary from the run's task results and the MLflow registry."""
    from mlflow import MlflowClient

    ctx = results["prepare"]
    reg, metrics = results["register"], results["evaluate"]
    uri = ctx["tracking_uri"]
    c = MlflowClient(tracking_uri=uri, registry_uri=uri)
    versions = []
    for name in (reg["encoder_model_name"], reg["scaler_model_name"]):
        for v in sorted(c.search_model_versions(f"name = '{name}'"), key=lambda v: int(v.version)):
            # search results carry no aliases; the single-version lookup does
            aliases = c.get_model_version(name, v.version).aliases
            versions.append({"model": name, "version": str(v.version), "aliases": sorted(aliases)})
    champion = str(c.get_model_version_by_alias(reg["encoder_model_name"], "champion").version)
    store = uri.removeprefix("sqlite:///")
    return {
        "mlflow_tracking_uri": uri,
        "mlflow_ui_command": f"mlflow ui --backend-store-uri {uri}",
        "mlflow_store": store,
        "encoder_model_name": reg["encoder_model_name"],
        "scaler_model_name": reg["scaler_model_name"],
        "encoder_version": reg["encoder_version"],
        "champion_version": champion,
        "gate": results["promote"],
        "versions": versions,
        "metrics": metrics,
        "dag_run_id": ctx["run_id"],
        "mlflow_run_id": ctx["mlflow_run_id"],
        "artifacts": ctx["run_dir"],
    }


def format_summary(s: dict[str, Any]) -> str:
    m = s["metrics"]
    lines = ["", "Evaluation on the test split", ""]
    lines.append(f"  {'features':<22}{'dims':>6}{'probe acc':>12}{'test MSE':>12}")
    rows = [
        ("SAE codes", m["code_dim"], m.get("probe_accuracy_sae"), m["test_mse"]),
        ("SAE, pretrain only", m["code_dim"], None, m["pretrain_only_test_mse"]),
        ("PCA", m["code_dim"], m.get("probe_accuracy_pca"), m["pca_test_mse"]),
        ("raw features", "all", m.get("probe_accuracy_raw"), None),
    ]
    for name, dims, acc, mse in rows:
        acc_s = f"{acc:.4f}" if acc is not None else "-"
        mse_s = f"{mse:.5f}" if mse is not None else "-"
        lines.append(f"  {name:<22}{dims!s:>6}{acc_s:>12}{mse_s:>12}")
    lines += ["", "Registered versions", ""]
    for v in s["versions"]:
        aliases = ", ".join(v["aliases"]) or "-"
        lines.append(f"  {v['model']:<24} v{v['version']:<4} {aliases}")
    lines += [
        "",
        f"Gate: {'promoted' if s['gate']['promoted'] else 'rejected'} ({s['gate']['reason']})",
        f"Champion: {s['encoder_model_name']} v{s['champion_version']}",
        f"MLflow store: {s['mlflow_store']}",
        f"Open the UI:  {s['mlflow_ui_command']}",
        "",
    ]
    return "\n".join(lines)


def run_demo(
    workdir: Path, conf: dict[str, Any] | None = None, quiet: bool = False, loop: bool = True
) -> dict[str, Any]:
    """Run the training DAG with ``dag.test()``, print and save the summary under ``workdir``.

    With ``loop`` (and the demo's own data), a quarter of the digits is held out of training
    as a fresh batch, and the loop (encode, drift check, retrain) runs after training.
    """
    from sae_pipeline.errors import SaePipelineError

    t0 = time.perf_counter()
    prepare_airflow(workdir / ".airflow")
    conf = {"artifacts_root": str(workdir / "artifacts"), **(conf or {})}
    batches = None
    if loop and "data_source" not in conf:
        from sae_pipeline.loop import demo_data

        batches = demo_data(workdir / "artifacts" / "demo_data")
        conf["data_source"] = batches["train"]
    dag_run = run_dag_test(REPO / "dags" / "sae_training.py", conf)
    state = str(getattr(dag_run.state, "value", dag_run.state))
    if state != "success":
        raise SaePipelineError(
            f"training DAG run {dag_run.run_id} ended {state}; see the log above"
        )
    summary = summarize(task_results(dag_run))
    if batches is not None:
        from sae_pipeline.loop import run_loop

        store = {
            "artifacts_root": conf["artifacts_root"],
            "tracking_uri": summary["mlflow_tracking_uri"],
            "encoder_model_name": summary["encoder_model_name"],
            "scaler_model_name": summary["scaler_model_name"],
        }
        if conf.get("config_path"):
            store["config_path"] = conf["config_path"]
        summary["loop"] = run_loop(store, batches)
    summary["wall_seconds"] = round(time.perf_counter() - t0, 1)
    out = workdir / "artifacts" / "demo_summary.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(summary, indent=2, default=str))
    os.replace(tmp, out)
    if not quiet:
        print(format_summary(summary))
        if "loop" in summary:
            from sae_pipeline.loop import format_loop

            print(format_loop(summary["loop"]))
        print(f"Summary JSON: {out}  ({summary['wall_seconds']} s)")
    return summary
