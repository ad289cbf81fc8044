"""``make demo``: run the training DAG through Airflow on embedded defaults and summarise it.

Airflow's metadata goes to SQLite under ``.airflow/``, MLflow to a SQLite store under
``artifacts/mlflow/``, data comes from scikit-learn's digits. Nothing needs a server.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from sae_pipeline.demo.airflow_run import REPO, prepare_airflow, run_dag_test, task_results


def summarize(results: dict[str, Any]) -> dict[str, Any]:
    """The demo summary from the run's task results and the MLflow registry."""

    ctx = results["prepare"]
    reg, metrics = results["register"], results["evaluate"]
    uri = ctx["tracking_uri"]
    champion, versions = registry_state(uri, reg["encoder_model_name"], reg["scaler_model_name"])
    store = uri.removeprefix("sqlite:///")
    return {
        "mlflow_tracking_uri": uri,
        "mlflow_ui_command": f"mlflow ui --backend-store-uri {uri}",
        "mlflow_store": store,
        "encoder_model_name": reg["encoder_model_name"],
        "scaler_model_name": reg["scaler_model_name"],
        "encoder_version": reg["encoder_version"],
        "champion_version": champion,  # the registry's champion now (after the loop, if any)
        "trained_champion_version": champion,  # the champion right after the first training
        "gate": results["promote"],
        "versions": versions,
        "metrics": metrics,
        "dag_run_id": ctx["run_id"],
        "mlflow_run_id": ctx["mlflow_run_id"],
        "artifacts": ctx["run_dir"],
    }


def registry_state(uri: str, encoder_name: str, scaler_name: str) -> tuple[str, list[dict]]:
    """The encoder's champion version and every version of both models with its aliases."""
    from mlflow import MlflowClient

    c = MlflowClient(tracking_uri=uri, registry_uri=uri)
    versions = []
    for name in (encoder_name, scaler_name):
        for v in sorted(c.search_model_versions(f"name = '{name}'"), key=lambda v: int(v.version)):
            # search results carry no aliases; the single-version lookup does
            aliases = c.get_model_version(name, v.version).aliases
            versions.append({"model": name, "version": str(v.version), "aliases": sorted(aliases)})
    champion = str(c.get_model_version_by_alias(encoder_name, "champion").version)
    return champion, versions


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
        f"Champion: {s['encoder_model_name']} v{s['champion_version']}"
        + (
            f" (first training made v{s['trained_champion_version']})"
            if s["champion_version"] != s["trained_champion_version"]
            else ""
        ),
        f"MLflow store: {s['mlflow_store']}",
        f"Open the UI:  {s['mlflow_ui_command']}",
        # The champion over HTTP (docs/service.md); it follows the alias when it moves.
        f"Serve it:     sae-pipeline serve --set registry.tracking_uri={s['mlflow_tracking_uri']}",
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
    from sae_pipeline import boundary
    from sae_pipeline.errors import SaePipelineError

    # The demo writes its Airflow home and data there before the DAG checks artifacts_root.
    boundary.artifact_location(str(workdir / "artifacts"), "--workdir")
    t0 = time.perf_counter()
    prepare_airflow(workdir / ".airflow")
    conf = {"artifacts_root": str(workdir / "artifacts"), **(conf or {})}
    batches = None
    if loop and "data_source" not in conf:
        from sae_pipeline.demo.loop import demo_data

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
        from sae_pipeline.demo.loop import run_loop

        store = {
            "artifacts_root": conf["artifacts_root"],
            "tracking_uri": summary["mlflow_tracking_uri"],
            "encoder_model_name": summary["encoder_model_name"],
            "scaler_model_name": summary["scaler_model_name"],
        }
        if conf.get("config_path"):
            store["config_path"] = conf["config_path"]
        summary["loop"] = run_loop(store, batches)
        # The loop may have promoted a retrained version: report what the registry says now.
        summary["champion_version"], summary["versions"] = registry_state(
            summary["mlflow_tracking_uri"],
            summary["encoder_model_name"],
            summary["scaler_model_name"],
        )
    summary["wall_seconds"] = round(time.perf_counter() - t0, 1)
    out = workdir / "artifacts" / "demo_summary.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(summary, indent=2, default=str))
    os.replace(tmp, out)
    if not quiet:
        print(format_summary(summary))
        if "loop" in summary:
            from sae_pipeline.demo.loop import format_loop

            print(format_loop(summary["loop"]))
        print(f"Summary JSON: {out}  ({summary['wall_seconds']} s)")
    return summary
