"""The demo's second half: closing the loop through Airflow on the digits.

After the training DAG has made a champion, a fresh batch drawn like the training data (digits
held out from training, plus two broken rows) is encoded by the batch-encoding DAG and checked
by the drift monitor: no drift, nothing triggered. Then the same digits, shifted (brighter,
noisy, partly occluded), are checked: drift, and the monitor queues a retraining run with the
new rows included. No scheduler runs here, so that queued run stays queued and the demo runs
the training DAG itself with the very conf the monitor queued (``dag.test(run_conf=...)``);
the retrained version becomes challenger, and champion only if it passes the gate.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from sae_pipeline import storage

FRESH_FRACTION = 0.25


def demo_data(data_dir: Path, seed: int = 0) -> dict[str, str]:
    """The digits split into training rows and a fresh batch, and a shifted copy of the batch.

    The fresh batch gets two rows with a missing pixel, which encoding quarantines.
    """
    from sklearn.model_selection import train_test_split

    from sae_pipeline.data.sources import load_sklearn

    digits = load_sklearn("digits")
    train, fresh = train_test_split(
        digits, test_size=FRESH_FRACTION, random_state=seed, stratify=digits["target"]
    )
    fresh = fresh.reset_index(drop=True)
    shifted = shift_digits(fresh, seed)
    fresh = fresh.astype({c: "float64" for c in fresh.columns if c.startswith("pixel_")})
    fresh.loc[[3, 11], ["pixel_20", "pixel_43"]] = np.nan
    paths = {
        "train": data_dir / "digits_train.parquet",
        "clean": data_dir / "batch_clean.parquet",
        "shifted": data_dir / "batch_shifted.parquet",
    }
    for name, frame in (("train", train), ("clean", fresh), ("shifted", shifted)):
        storage.write_parquet(str(paths[name]), frame.reset_index(drop=True))
    return {k: str(v) for k, v in paths.items()}


def shift_digits(frame, seed: int = 0):
    """Brighter, noisier digits with a 3x3 patch blanked: what a new scanner might send."""
    rng = np.random.default_rng(seed + 1)
    pixels = [c for c in frame.columns if c.startswith("pixel_")]
    x = frame[pixels].to_numpy(dtype=np.float64).reshape(-1, 8, 8)  # (images, 8, 8)
    x = x + 3.0 + rng.normal(0.0, 2.0, x.shape)
    for img, (r, c) in zip(x, rng.integers(1, 5, size=(len(x), 2)), strict=True):
        img[r : r + 3, c : c + 3] = 0.0
    out = frame.copy()
    out[pixels] = np.clip(x, 0.0, 16.0).reshape(len(frame), -1)
    return out


def _state(dag_run) -> str:
    return str(getattr(dag_run.state, "value", dag_run.state))


def _run(dag_file: str, conf: dict[str, Any], dag_attr: str):
    from sae_pipeline.demo.airflow_run import REPO, run_dag_test, task_results
    from sae_pipeline.errors import SaePipelineError

    dag_run = run_dag_test(REPO / "dags" / dag_file, conf, dag_attr)
    if _state(dag_run) != "success":
        raise SaePipelineError(f"{dag_run.dag_id} run {dag_run.run_id} ended {_state(dag_run)}")
    return dag_run, task_results(dag_run)


def queued_run(dag_id: str, run_id: str) -> dict[str, Any] | None:
    """A DAG run as the metadata database holds it (the one TriggerDagRunOperator queued)."""
    from airflow.models.dagrun import DagRun
    from airflow.utils.session import create_session

    with create_session() as session:
        dr = session.query(DagRun).filter(DagRun.dag_id == dag_id, DagRun.run_id == run_id).first()
        if dr is None:
            return None
        return {"run_id": dr.run_id, "state": str(dr.state), "conf": dict(dr.conf or {})}


def check_batch(batch: str, store: dict[str, Any]) -> dict[str, Any]:
    """Run the drift monitor DAG on ``batch``; the check's summary and what it queued."""
    dag_run, results = _run("sae_drift_monitor.py", {"batch": batch, **store}, "drift_dag")
    out = {"batch": batch, "dag_run_id": dag_run.run_id, **results["check"]}
    out["queued_training_run"] = queued_run("sae_training", f"drift__{dag_run.run_id}")
    out["training_conf"] = results.get("retraining_conf")
    return out


def encode_batch(batch: str, store: dict[str, Any]) -> dict[str, Any]:
    """Run the batch-encoding DAG on ``batch``; the committed output's manifest."""
    _, results = _run("sae_batch_encoding.py", {"batch": batch, **store}, "encoding_dag")
    return results["commit"]


def run_loop(store: dict[str, Any], batches: dict[str, str]) -> dict[str, Any]:
    """Encode and check the clean batch, check the shifted one, retrain if asked; summarise.

    ``store`` holds the DAG params that point at the demo's store (``artifacts_root``,
    ``tracking_uri``, model names).
    """
    from mlflow import MlflowClient

    uri = store["tracking_uri"]
    c = MlflowClient(tracking_uri=uri, registry_uri=uri)
    name = store["encoder_model_name"]
    before = str(c.get_model_version_by_alias(name, "champion").version)

    encoded = encode_batch(batches["clean"], store)
    clean = check_batch(batches["clean"], store)
    shifted = check_batch(batches["shifted"], store)
    loop: dict[str, Any] = {
        "clean_batch": {**_view(clean), "encoded": _encoded_view(encoded)},
        "shifted_batch": _view(shifted),
        "champion_before": before,
    }
    decision, reason = "not_retrained", "no batch asked for retraining"
    conf = shifted["training_conf"] if shifted["retrain_triggered"] else None
    if conf:
        # The monitor queued this conf; a scheduler would start that run. Run it here.
        dag_run, results = _run("sae_training.py", conf, "training_dag")
        reg, gate = results["register"], results["promote"]
        version = c.get_model_version(name, reg["encoder_version"])
        decision = version.tags.get(
            "sae.gate.decision", "promoted" if gate["promoted"] else "rejected"
        )
        reason = version.tags.get("sae.gate.reason", gate["reason"])
        loop["retraining"] = {
            "dag_run_id": dag_run.run_id,
            "queued_run_id": (shifted["queued_training_run"] or {}).get("run_id"),
            "data_source": conf["data_source"],
            "challenger_version": reg["encoder_version"],
            "gate_basis": version.tags.get("sae.gate.basis"),
        }
    loop["champion_after"] = str(c.get_model_version_by_alias(name, "champion").version)
    loop["decision"] = decision
    loop["reason"] = reason
    return loop


def _view(check: dict[str, Any]) -> dict[str, Any]:
    keep = (
        "batch", "rows_in", "rows_valid", "rows_quarantined", "drift_detected",
        "retrain_triggered", "decision", "reason", "drift_share", "report_dir", "mlflow_run_id",
        "model_version",
    )  # fmt: skip
    out = {k: check[k] for k in keep if k in check}
    queued = check.get("queued_training_run")
    out["queued_training_run"] = queued["run_id"] if queued else None
    return out


def _encoded_view(manifest: dict[str, Any]) -> dict[str, Any]:
    keep = ("output", "model_version", "rows_in", "rows_encoded", "rows_quarantined")
    return {k: manifest[k] for k in keep}


def format_loop(loop: dict[str, Any]) -> str:
    """The loop's part of the demo printout."""

    def shares(b: dict[str, Any]) -> str:
        return ", ".join(f"{k} {v:.2f}" for k, v in b["drift_share"].items())

    clean, shifted, enc = loop["clean_batch"], loop["shifted_batch"], loop["clean_batch"]["encoded"]
    lines = ["", "Closing the loop (batch encoding, drift monitor, retraining)", ""]
    lines.append(
        f"  clean batch:   {enc['rows_in']} rows -> {enc['rows_encoded']} encoded + "
        f"{enc['rows_quarantined']} quarantined by v{enc['model_version']} ({enc['output']})"
    )
    lines.append(f"                 drift share {shares(clean)} -> {clean['decision']}; "
                 f"retraining triggered: {clean['retrain_triggered']}")  # fmt: skip
    lines.append(f"  shifted batch: drift share {shares(shifted)} -> {shifted['decision']}; "
                 f"retraining triggered: {shifted['retrain_triggered']}")  # fmt: skip
    lines.append(
        "  review:        the monitor's `review` task; here the policy's `review: auto` let it "
        "pass (with `review: required` a person chooses retrain, accept or dismiss there)"
    )
    if "retraining" in loop:
        r = loop["retraining"]
        lines.append(
            f"                 queued sae_training run {r['queued_run_id']} (a scheduler starts "
            "it; here the demo ran that conf with dag.test)"
        )
        lines.append(f"  retrained:     v{r['challenger_version']} registered as challenger, "
                     f"on {r['data_source']}")  # fmt: skip
        lines.append(f"  gate:          {loop['decision']}: {loop['reason']}")
        lines.append(f"                 ({r['gate_basis']})")
    lines.append(f"  champion:      v{loop['champion_before']} -> v{loop['champion_after']}")
    lines.append(f"  drift reports: {shifted['report_dir']} (and in MLflow, sae-monitoring)")
    return "\n".join(lines)
