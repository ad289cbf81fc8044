"""The drift monitor's steps: reference, check (reports, MLflow, decision), retraining data.

Each step takes the small context of ``batch_context`` (champion version pinned), writes to
the artifact store atomically and returns a small JSON-able dict; the DAG and the CLI call the
same functions. Where things go::

    <root>/monitoring/reference/<model>/v<version>-<sample>.parquet    the champion's reference
    <root>/monitoring/checks/<run key>/{raw,codes,reconstruction_error}.{html,json}, summary.json
    <root>/monitoring/decisions/<model>/v<version>/<batch key>-p<hash>.json  what was acted on,
                                                     by which run (``_drift_decisions``)
    <root>/retraining/<run key>/training_data.parquet(.json)  champion snapshot + batch, and
                                                     its manifest (``_retraining``)

and one MLflow run per check in the monitoring experiment (``DriftPolicy.experiment``): the
summary as the run's description, the drift shares as metrics, the reports as artifacts.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sae_pipeline import storage
from sae_pipeline.data import batches
from sae_pipeline.monitoring.drift import EVIDENTLY_SIGNALS, DriftPolicy
from sae_pipeline.registry import champion
from sae_pipeline.registry.champion import ModelRef
from sae_pipeline.steps._drift_decisions import earlier_decision
from sae_pipeline.steps._retraining import (  # noqa: F401  (the DAG's and CLI's names)
    prepare_data,
    retrain,
    training_conf,
)
from sae_pipeline.steps.batch_context import batch_context

log = logging.getLogger(__name__)

CHECK_TAG = "sae.check_key"
HELDOUT_COLUMN = "heldout"


def _ref(ctx: dict[str, Any]) -> ModelRef:
    return ModelRef.from_dict(ctx["model"])


def _policy(ctx: dict[str, Any]) -> DriftPolicy:
    return DriftPolicy.model_validate(ctx["policy"])


def check_dir(ctx: dict[str, Any]) -> str:
    return storage.join(ctx["artifacts_root"], "monitoring", "checks", ctx["run_key"])


# DAG params -> drift policy fields they override (None leaves the policy's value).
POLICY_PARAMS = {
    "drift_share": "drift_share",
    "min_rows": "min_rows",
    "sample_rows": "sample_rows",
    "retrain": "retrain",
    "monitoring_experiment": "experiment",
}


def policy_overrides(params: dict[str, Any]) -> dict[str, Any]:
    """DAG params as dotted policy overrides; ``signal_thresholds`` sets per-signal shares."""
    out = {field: params.get(name) for name, field in POLICY_PARAMS.items()}
    for signal, share in (params.get("signal_thresholds") or {}).items():
        out[f"signals.{signal}.drift_share"] = share
    if params.get("review"):  # one mode for every reviewed decision
        out["review.retrain"] = out["review.drift_alert"] = params["review"]
    return {k: v for k, v in out.items() if v is not None}


def context(run_id: str, params: dict[str, Any], events=None, latest=None) -> dict[str, Any]:
    """The drift DAG's context: ``batch_context`` plus the resolved drift policy."""
    from sae_pipeline.steps.deployment import check_config_path

    # A policy file a trigger names is a place: under $SAE_ALLOWED_CONFIG_DIRS, normalised.
    policy_path = check_config_path(params.get("policy_path"), "policy_path")
    policy_path = policy_path or os.environ.get(POLICY_ENV)
    ctx = batch_context(run_id, params, events, latest)
    return prepare(ctx, policy_path, policy_overrides(params))


POLICY_ENV = "SAE_DRIFT_POLICY"  # the deployment's policy: its review is the floor


def prepare(
    ctx: dict[str, Any], policy_path: str | None = None, overrides: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Add the resolved drift policy to a batch context (``batch_context``).

    ``policy_path`` and ``overrides`` are the run's (DAG params, CLI flags); the review section
    is the deployment's (``$SAE_DRIFT_POLICY``, else the defaults), raised where the run asks
    for more review: a run cannot lower the review the deployment requires. Under a deployment
    policy its judging fields (drift shares, signals, rows, downstream) are the ones used, and
    a run that tries to change one is refused, before anything is read or written.
    """
    from sae_pipeline.monitoring.drift import deployment_judges, load_policy

    deployed_path = os.environ.get(POLICY_ENV) or None
    if deployed_path is None:  # the embedded demo: the run's policy judges
        policy = load_policy(policy_path, overrides)
    else:
        policy = deployment_judges(deployed_path, policy_path, overrides)
    deployed = load_policy(deployed_path).review
    policy = policy.model_copy(update={"review": deployed.raised_by(policy.review)})
    return {**ctx, "policy": policy.model_dump(mode="json")}


# ---- reference --------------------------------------------------------------------------------
def reference_uri(ctx: dict[str, Any], accepted_keys: list[str]) -> str:
    """Where the reference of (champion version, sample, accepted batches) is cached.

    The accepted batches enter as a hash of every key: accepting one more batch, wherever
    its key sorts, names another reference.
    """
    ref, policy = _ref(ctx), _policy(ctx)
    tag = f"n{policy.sample_rows}-s{policy.seed}" if policy.sample_rows else "all"
    if accepted_keys:
        keys = "\n".join(sorted(accepted_keys))
        tag += "-a" + hashlib.sha256(keys.encode()).hexdigest()[:16]
    return storage.join(
        ctx["artifacts_root"], "monitoring", "reference", ref.name, f"v{ref.version}-{tag}.parquet"
    )


def reference(ctx: dict[str, Any]) -> dict[str, Any]:
    """The champion's reference signals, computed once per version and kept in the store.

    Raw features and codes come from the training snapshot. The reconstruction error's
    reference comes from the snapshot's held-out rows (validation and test split) only: the
    model has fitted its training rows, so their errors are lower than those of any new rows
    drawn from the same distribution, and a clean batch would look drifted.
    """
    from sae_pipeline.steps.review import accepted_batches

    ref, policy = _ref(ctx), _policy(ctx)
    accepted = accepted_batches(ctx)  # batches a reviewer accepted as the new normal
    uri = reference_uri(ctx, [b["key"] for b in accepted])
    if storage.exists(uri + ".json"):  # written last: the reference is complete
        return {"reference": uri, **storage.read_json(uri + ".json")}
    import pandas as pd

    from sae_pipeline.engine.encoder import ERROR_COLUMN, encode_rows

    encoder = champion.load_encoder(ref)
    # A fixed-size seeded sample (streamed runs: read row group by row group).
    features = encoder.contract.feature_columns
    x, heldout = champion.reference_rows(ref, features, policy.sample_rows, policy.seed)
    codes, err = encode_rows(encoder, x)
    frame = pd.DataFrame(x, columns=features)
    frame[encoder.code_columns] = codes
    frame[ERROR_COLUMN] = err
    frame[HELDOUT_COLUMN] = heldout
    for batch in accepted:  # new rows to the model: held out, like the validation split
        rows, _ = batches.read_batch_sample(
            {"batch": batch}, encoder.contract.feature_columns, policy.sample_rows, policy.seed
        )
        codes, err = encode_rows(encoder, rows.to_numpy(dtype="float64"))
        rows[encoder.code_columns] = codes
        rows[ERROR_COLUMN], rows[HELDOUT_COLUMN] = err, True
        frame = pd.concat([frame, rows], ignore_index=True)
    storage.write_parquet(uri, frame)
    meta = {"rows": len(frame), "rows_heldout": int(frame[HELDOUT_COLUMN].sum())}
    storage.write_json(uri + ".json", meta)
    log.info("reference of %s v%s: %s", ref.name, ref.version, meta)
    return {"reference": uri, **meta}


# ---- the check --------------------------------------------------------------------------------
def check(
    ctx: dict[str, Any],
    reference_info: dict[str, Any],
    on_stage: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Three Evidently reports, saved and logged, and the policy's decision.

    Returns the summary (without per-column detail), which ``summary.json`` holds in full.
    ``on_stage`` is told each stage as it finishes (the CLI's progress bar).
    """

    from sae_pipeline.engine.encoder import ERROR_COLUMN
    from sae_pipeline.monitoring.downstream import combine
    from sae_pipeline.monitoring.drift import (
        decide,
        report_title,
        run_report,
        signal_frames,
        summary_markdown,
        titled_html,
    )
    from sae_pipeline.monitoring.flagged import FLAG_COLUMN, FLAGGED, flagged_share_result
    from sae_pipeline.steps._downstream import downstream_check

    out = check_dir(ctx)
    summary_uri = storage.join(out, "summary.json")
    if storage.exists(summary_uri):  # a retry: the reports and the MLflow run exist
        return _short(storage.read_json(summary_uri))
    earlier = earlier_decision(ctx)
    if earlier is not None:
        return earlier
    ref, policy = _ref(ctx), _policy(ctx)
    encoder = champion.load_encoder(ref)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    current_raw, counts = batches.read_batch_sample(
        ctx, encoder.contract.feature_columns, policy.sample_rows, policy.seed
    )
    timings["read_batch"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    current = signal_frames(encoder, current_raw)
    timings["encode_batch"] = time.perf_counter() - t0
    stage = on_stage or (lambda _name: None)
    stage("read and encode the batch")
    t0 = time.perf_counter()
    ref_frame = storage.read_parquet(reference_info["reference"])
    heldout = ref_frame[HELDOUT_COLUMN].to_numpy()
    reference_frames = {
        "raw": ref_frame[encoder.contract.feature_columns],
        "codes": ref_frame[encoder.code_columns],
        # Held-out rows only: see ``reference``.
        "reconstruction_error": ref_frame.loc[heldout, [ERROR_COLUMN]].reset_index(drop=True),
    }
    timings["read_reference"] = time.perf_counter() - t0

    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in EVIDENTLY_SIGNALS:
            if not policy.signal(name).enabled or len(current_raw) == 0:
                continue
            t0 = time.perf_counter()
            snapshot, results[name] = run_report(
                current[name], reference_frames[name], policy, name
            )
            timings[f"evidently_{name}"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            snapshot.save_html(str(Path(tmp) / f"{name}.html"))
            snapshot.save_json(str(Path(tmp) / f"{name}.json"))
            timings[f"save_{name}"] = time.perf_counter() - t0
            stage(f"{name} report")
        if FLAGGED in current and policy.signal(FLAGGED).enabled and len(current_raw):
            results[FLAGGED] = flagged_share_result(
                current[FLAGGED][FLAG_COLUMN].to_numpy(),
                encoder.anomaly[0]["expected_share"],
                policy.signal(FLAGGED).threshold,
            )
        downstream = downstream_check(ctx, encoder, policy)  # the probe, on labelled batches
        decision = decide(results, counts["rows_valid"], policy)
        decision = combine(decision, downstream, policy.retrain)
        summary = {
            "batch_key": ctx["batch"]["key"],
            "batch_files": ctx["batch"]["files"],
            "model_name": ref.name,
            "model_version": ref.version,
            **counts,
            "rows_tested": len(current_raw),
            "rows_reference": len(ref_frame),
            "rows_reference_heldout": int(heldout.sum()),
            **decision,
            "signals": {k: _without(r, "per_column") for k, r in results.items()},
            "downstream": downstream,
            "policy": policy.model_dump(mode="json"),
            "report_dir": out,
            "dag_run_id": ctx["run_id"],
        }  # fmt: skip
        if len(current_raw):
            summary["mean_reconstruction_error"] = {
                "current": float(current["reconstruction_error"][ERROR_COLUMN].mean()),
                "reference": float(reference_frames["reconstruction_error"][ERROR_COLUMN].mean()),
            }
        summary["summary"] = summary_markdown(summary)
        sentence = f"Decision: {summary['decision']}: {summary['reason']}"
        for name in results:
            page = Path(tmp) / f"{name}.html"
            if page.exists():  # the Evidently reports: titled, the decision on top
                title = report_title(name, summary)
                page.write_text(titled_html(page.read_text(encoding="utf-8"), title, sentence))
        storage.write_json(
            str(Path(tmp) / "columns.json"), {k: r["per_column"] for k, r in results.items()}
        )
        t0 = time.perf_counter()
        summary["mlflow_run_id"] = log_check(ctx, summary, tmp)
        timings["mlflow"] = time.perf_counter() - t0
        stage("log to MLflow")
        summary["timings"] = {k: round(v, 3) for k, v in timings.items()}
        storage.write_json(str(Path(tmp) / "summary.json"), summary)
        _client(ctx).log_artifact(
            summary["mlflow_run_id"], str(Path(tmp) / "summary.json"), "drift"
        )
        _publish(Path(tmp), out)
    short = _short(summary)  # the decision is recorded when acted on (``review.record``)
    log.info("drift check %s: %s", ctx["run_key"], summary["summary"])
    return short


# ---- reports and MLflow ----------------------------------------------------------------------
def _publish(local: Path, out: str) -> None:
    """Copy the check's files to the store, ``summary.json`` last: it marks the check done."""
    files = sorted(local.iterdir(), key=lambda f: f.name == "summary.json")
    for f in files:
        storage.write_bytes(storage.join(out, f.name), f.read_bytes())


def _without(d: dict[str, Any], key: str) -> dict[str, Any]:
    return {k: v for k, v in d.items() if k != key}


def _short(summary: dict[str, Any]) -> dict[str, Any]:
    """What goes through XCom: the decision and the shares, not the policy or the reports."""
    keep = (
        "batch_key", "model_name", "model_version", "rows_in", "rows_valid", "rows_quarantined",
        "rows_tested", "drift_detected", "retrain_triggered", "decision", "reason",
        "drifted_signals", "report_dir", "mlflow_run_id",
    )  # fmt: skip
    out = {k: summary[k] for k in keep if k in summary}
    out["drift_share"] = {k: r["drift_share"] for k, r in summary["signals"].items()}
    if summary.get("downstream"):
        out["downstream"] = summary["downstream"]
    return out


def _client(ctx: dict[str, Any]):
    from mlflow import MlflowClient

    uri = ctx["tracking_uri"]
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def log_check(ctx: dict[str, Any], summary: dict[str, Any], report_dir: str) -> str:
    """One MLflow run per check (found again by its key on a retry); returns its id.

    The description is the summary's text; metrics, tags and the reports go in one batch each.
    """
    from mlflow.entities import Metric, Param, RunTag

    from sae_pipeline.config import build_config
    from sae_pipeline.registry import tracking

    c = _client(ctx)
    cfg = build_config({}, {"registry.experiment": summary["policy"]["experiment"]})
    exp = tracking.experiment_id(c, cfg)
    key = ctx["run_key"]
    found = c.search_runs([exp], filter_string=f"tags.`{CHECK_TAG}` = '{key}'", max_results=1)
    if found:
        run_id = found[0].info.run_id
    else:
        run_name = f"{summary['batch_key']}-v{summary['model_version']}"
        run_id = c.create_run(exp, run_name=run_name, tags={CHECK_TAG: key}).info.run_id
    ts = int(time.time() * 1000)
    metrics = {
        "rows_in": summary["rows_in"],
        "rows_valid": summary["rows_valid"],
        "rows_quarantined": summary["rows_quarantined"],
        "rows_tested": summary["rows_tested"],
        "drift_detected": float(summary["drift_detected"]),
        "retrain_triggered": float(summary["retrain_triggered"]),
    }
    for name, r in summary["signals"].items():
        metrics[f"drift_share_{name}"] = r["drift_share"]
        metrics[f"drifted_columns_{name}"] = r["drifted_columns"]
    for k in ("accuracy", "reference_accuracy", "drop"):
        if k in (summary.get("downstream") or {}):
            metrics[f"downstream_{k}"] = summary["downstream"][k]
    for which, v in summary.get("mean_reconstruction_error", {}).items():
        metrics[f"mean_reconstruction_error_{which}"] = v
    tags = {
        "mlflow.note.content": summary["summary"],
        "sae.batch": summary["batch_key"],
        "sae.model_name": summary["model_name"],
        "sae.model_version": summary["model_version"],
        "sae.drift.decision": summary["decision"],
        "sae.drift.reason": summary["reason"][:5000],
        "sae.dag_run_id": summary["dag_run_id"],
    }
    policy = summary["policy"]
    params = {
        "batch_files": ",".join(summary["batch_files"])[:6000],
        "drift_share": policy["drift_share"],
        "min_rows": policy["min_rows"],
        "sample_rows": policy["sample_rows"],
    }
    for name, sp in policy["signals"].items():
        for k, v in sp.items():
            params[f"{name}.{k}"] = v
    existing = c.get_run(run_id).data.params
    c.log_batch(
        run_id,
        metrics=[Metric(k, float(v), ts, 0) for k, v in metrics.items()],
        params=[Param(k, str(v)) for k, v in params.items() if k not in existing],
        tags=[RunTag(k, str(v)) for k, v in tags.items()],
    )
    c.log_artifacts(run_id, report_dir, artifact_path="drift")
    c.set_terminated(run_id)
    return run_id


# ---- outside Airflow --------------------------------------------------------------------------
def run_check(ctx: dict[str, Any], progress: bool = False) -> dict[str, Any]:
    """Reference and check in this process (the CLI's ``drift``), with a progress bar."""
    bar = None
    if progress:
        from tqdm import tqdm

        policy = _policy(ctx)
        signals = sum(policy.signal(s).enabled for s in EVIDENTLY_SIGNALS)
        bar = tqdm(total=3 + signals, desc="drift check", unit="step")
    try:
        ref = reference(ctx)
        if bar is not None:
            bar.update(1)
            bar.set_postfix_str("reference")

        def on_stage(name: str) -> None:
            if bar is not None:
                bar.update(1)
                bar.set_postfix_str(name)

        return check(ctx, ref, on_stage)
    finally:
        if bar is not None:
            bar.close()
