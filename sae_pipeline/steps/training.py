"""The training DAG's steps, in DAG order: plain Python, no Airflow.

prepare -> ingest -> validate -> split -> fit_scaler -> [candidates] -> pretrain_layer (each
layer) -> finetune -> evaluate -> register -> promote. The data steps live in
``_training_data``, the network steps in ``_training_net``, the run context in ``_run``; this
module is the one the DAG file and the CLI call. See ``_run`` for the contract every step keeps.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from sae_pipeline import storage
from sae_pipeline.config import PipelineConfig
from sae_pipeline.registry.gate import gate_decision
from sae_pipeline.steps._run import _uri, code_version, config_of, prepare
from sae_pipeline.steps._training_anomaly import fit_anomaly
from sae_pipeline.steps._training_data import (
    _dataset,
    _scaled,
    fit_scaler,
    ingest,
    split,
    validate,
)
from sae_pipeline.steps._training_net import (
    architecture,
    finetune,
    load_encoder,
    load_trained,
    pretrain_layer,
    select_candidate,
    try_candidate,
)

log = logging.getLogger(__name__)

NEEDS_REVIEW_COLUMNS = "needs review: champion reads other columns"

__all__ = [
    "architecture",
    "config_of",
    "evaluate",
    "finetune",
    "fit_scaler",
    "gate_decision",
    "ingest",
    "load_encoder",
    "load_trained",
    "mark_failed",
    "prepare",
    "pretrain_layer",
    "promote",
    "register",
    "run_training",
    "select_candidate",
    "split",
    "try_candidate",
    "validate",
]


# ---- evaluation and registry ------------------------------------------------------------------
def evaluate(ctx: dict[str, Any]) -> dict[str, Any]:
    """Test reconstruction and probe accuracy: SAE codes vs raw features vs PCA; with
    ``anomaly.enabled``, the anomaly detector first (``_training_anomaly.fit_anomaly``)."""
    from sae_pipeline.engine import trainer
    from sae_pipeline.engine.evaluation import evaluate_features, reconstruction_errors
    from sae_pipeline.registry import tracking

    cfg = config_of(ctx)
    if cfg.anomaly.enabled:  # before register, which bundles the detector
        fit_anomaly(ctx, load_trained(ctx, "model"))
    out = _uri(ctx, "evaluate", "metrics.json")
    if storage.exists(out):
        return storage.read_json(out)
    data = _dataset(ctx)
    scaled = _scaled(ctx, data)
    net, pretrained = load_trained(ctx, "model"), load_trained(ctx, "pretrained")
    x_train, x_test = scaled["train"], scaled["test"]
    metrics = evaluate_features(
        x_train,
        x_test,
        trainer.encode_array(net, x_train),
        trainer.encode_array(net, x_test),
        trainer.reconstruct_array(net, x_test),
        data["y_train"],
        data["y_test"],
        cfg.evaluation.probe_max_iter,
        cfg.training.seed,
    )
    pre = reconstruction_errors(x_test, trainer.reconstruct_array(pretrained, x_test))
    metrics["pretrain_only_test_mse"] = pre["mse"]
    metrics["pretrain_only_test_mae"] = pre["mae"]
    metrics["rows_test"] = len(x_test)
    _log_pictures(ctx, cfg, net, x_test, data["y_test"])
    storage.write_json(out, metrics)
    tracking.log_metrics(cfg, ctx["mlflow_run_id"], metrics)
    log.info("evaluation: %s", metrics)
    return metrics


def _log_pictures(ctx, cfg, net, x_test, y_test) -> None:
    """Loss curves, reconstructions, code map and first-layer filters, logged to MLflow."""
    import tempfile

    from sae_pipeline.engine import plots, trainer
    from sae_pipeline.registry import tracking

    histories = {
        f"layer {k}": storage.read_json(_uri(ctx, "pretrain", f"layer_{k}_history.json"))
        for k in range(1, cfg.n_layers + 1)
    }
    histories["fine-tune"] = storage.read_json(_uri(ctx, "finetune", "history.json"))
    with tempfile.TemporaryDirectory() as tmp:
        paths = plots.save_all(
            Path(tmp),
            histories,
            x_test,
            trainer.reconstruct_array(net, x_test),
            trainer.encode_array(net, x_test),
            y_test,
            net.encoders[0].weight.detach().numpy(),
        )
        for path in paths:
            tracking.log_artifact_file(cfg, ctx["mlflow_run_id"], str(path), "plots")
            storage.write_bytes(_uri(ctx, "evaluate", "plots", path.name), path.read_bytes())


def register(ctx: dict[str, Any], monitor_run: str | None = None) -> dict[str, Any]:
    """Register encoder bundle and scaler as new versions and give them the alias challenger.

    ``monitor_run``: the drift monitor run that queued this one; the review its decision
    record holds becomes ``sae.review.*`` tags on both (``review_tags_for``: only a record of
    that run approving training on this run's data counts).
    """
    from sae_pipeline.registry import tracking
    from sae_pipeline.steps._drift_decisions import review_tags_for

    cfg = config_of(ctx)
    review = review_tags_for(cfg.artifacts_root, monitor_run, cfg.data.source)
    manifest = storage.read_json(_uri(ctx, "validate", "manifest.json"))
    encoder = load_encoder(ctx)
    data = _dataset(ctx)
    example = data["frame"].iloc[:20][encoder.contract.feature_columns]
    lineage = {
        "sae.data_hash": manifest["content_hash"],
        "sae.dag_run_id": ctx["run_id"],
        "sae.code_version": code_version(),
        "sae.config_hash": cfg.config_hash(),
        "sae.mlflow_run_id": ctx["mlflow_run_id"],
        **review,
    }
    versions = tracking.register_encoder(
        cfg, ctx["mlflow_run_id"], ctx["run_key"], encoder, example, lineage,
        **_probe_section(encoder, data, cfg),
    )  # fmt: skip
    return {
        "encoder_model_name": cfg.registry.encoder_model_name,
        "scaler_model_name": cfg.registry.scaler_model_name,
        "encoder_version": versions["encoder"],
        "scaler_version": versions["scaler"],
    }


def _probe_section(encoder, data: dict[str, Any], cfg: PipelineConfig) -> dict[str, Any]:
    """The probe that travels with the encoder (plain coefficients), when there are labels."""
    from sae_pipeline.engine.encoder import encode_rows
    from sae_pipeline.engine.evaluation import fit_probe

    if data.get("y_train") is None or len(set(data["y_train"].tolist())) < 2:
        return {}
    codes_train, _ = encode_rows(encoder, data["x_train"])
    codes_test, _ = encode_rows(encoder, data["x_test"])
    probe = fit_probe(
        codes_train, data["y_train"], codes_test, data["y_test"], cfg.evaluation.probe_max_iter
    )
    return {"probe": probe}


def _common_evaluation(ctx: dict[str, Any], cfg: PipelineConfig, name: str, version: str):
    """Challenger and champion ``version`` measured on the challenger's test rows that neither
    trained on: (challenger metrics, champion metrics, basis); or, when there is no common
    basis, the reason a person must review the challenger instead.

    An MLflow or OS error (a server hiccup, a missing file) propagates: the task fails and is
    retried, rather than the gate falling back to numbers measured on other rows and scales.
    """
    from sae_pipeline.registry import champion as champions
    from sae_pipeline.registry import gate as comparison
    from sae_pipeline.registry import tracking

    challenger = load_encoder(ctx)
    champion = comparison.registered_encoder(tracking.tracking_uri(cfg), name, version)
    if not comparison.same_columns(challenger, champion):
        return NEEDS_REVIEW_COLUMNS
    ref = champions.resolve(cfg, version=version)
    # Streamed runs: _dataset holds fixed-size seeded samples, and the champion's snapshot is
    # streamed past them, so the gate's cost does not grow with either data set.
    data = _dataset(ctx)
    trained = comparison.trained_among(ref, data["x_test"], list(champion.contract.feature_columns))
    data, excluded = comparison.without_mask(data, trained)
    if len(data["x_test"]) == 0:
        return f"needs review: the champion trained on all {excluded} of the challenger's test rows"
    return comparison.on_test_split(
        challenger, champion, data, cfg.evaluation.probe_max_iter, excluded
    )


def promote(ctx: dict[str, Any], registered: dict[str, Any]) -> dict[str, Any]:
    """Make the challenger champion if it passes the gate; record the decision on the version.

    One promotion of a model at a time (``promotion_lock``); every attempt, a retry included,
    ends with both ``champion`` aliases on one pair (``promotion.converge``).
    """
    from sae_pipeline.registry import promotion, tracking

    cfg = config_of(ctx)
    c = tracking.client(cfg)
    enc_name, sc_name = registered["encoder_model_name"], registered["scaler_model_name"]
    version = registered["encoder_version"]
    with promotion.promotion_lock(cfg, enc_name):
        current = tracking.alias_version(c, enc_name, tracking.CHAMPION)
        if current is not None and str(current.version) == version:
            promotion.converge(c, enc_name, sc_name)  # a retry: the scaler's alias may lag
            return {"promoted": True, "reason": "already champion", "champion_version": version}
        challenger = storage.read_json(_uri(ctx, "evaluate", "metrics.json"))
        champion_metrics, basis = None, "no champion to compare with"
        promoted, reason = True, "no champion yet"
        if current is not None:
            common = _common_evaluation(ctx, cfg, enc_name, str(current.version))
            if isinstance(common, str):  # no common basis: a person decides, not old numbers
                promoted, reason = False, common
                basis = "none: no rows both models can fairly be measured on"
            else:  # both models on the same rows, which neither trained on: a fair comparison
                challenger, champion_metrics, basis = common
                tracking.log_metrics(
                    cfg,
                    ctx["mlflow_run_id"],
                    {f"gate_champion_{k}": v for k, v in champion_metrics.items()}
                    | {f"gate_challenger_{k}": v for k, v in challenger.items()},
                )
                promoted, reason = gate_decision(challenger, champion_metrics, cfg)
        decision = "promoted" if promoted else "rejected"
        for name, v in ((enc_name, version), (sc_name, registered["scaler_version"])):
            c.set_model_version_tag(name, v, "sae.gate.decision", decision)
            c.set_model_version_tag(name, v, "sae.gate.reason", reason)
            c.set_model_version_tag(name, v, "sae.gate.basis", basis)
            if current is not None:
                c.set_model_version_tag(name, v, "sae.gate.compared_to", str(current.version))
        tracking.set_run_tags(
            cfg, ctx["mlflow_run_id"], {"sae.gate.decision": decision, "sae.gate.reason": reason}
        )
        if promoted:
            champion = promotion.set_champion(c, enc_name, version, sc_name)
        else:  # leave the champion, but repair a pair another writer left split
            champion = promotion.converge(c, enc_name, sc_name)
    log.info("gate: %s (%s); champion is version %s", decision, reason, champion)
    return {"promoted": promoted, "reason": reason, "champion_version": champion}


def mark_failed(ctx: dict[str, Any], reason: str) -> None:
    """End the DAG run's MLflow run as FAILED (a task failed for good); else it stays Running."""
    from sae_pipeline.registry import tracking

    tracking.mark_failed(config_of(ctx), ctx["mlflow_run_id"], reason)
    log.info("MLflow run %s marked FAILED: %s", ctx["mlflow_run_id"], reason)


def report_to_monitor(ctx: dict[str, Any], monitor_run: str, ok: bool, detail: str) -> None:
    """Write this retraining's end into the record of the drift monitor run that queued it."""
    from sae_pipeline.steps._drift_decisions import report_retraining

    report_retraining(config_of(ctx).artifacts_root, monitor_run, ctx["run_id"], ok, detail)


def run_training(
    run_id: str,
    config_path: str | None = None,
    overrides: dict[str, Any] | None = None,
    resume: bool | None = None,
    monitor_run: str | None = None,
) -> dict[str, Any]:
    """Every training step in DAG order; returns what each step returned.

    ``resume``: False for a new run (refused when ``run_id`` is taken), True to continue run
    ``run_id`` with the config it was started with (``prepare``). ``monitor_run``: the drift
    monitor run that asked for this retraining (``register``).
    """
    ctx = prepare(run_id, config_path, overrides, resume=resume)
    try:
        return _run_steps(ctx, monitor_run)
    except Exception as err:  # as the DAG's failure callback: the MLflow run ends FAILED
        mark_failed(ctx, f"{type(err).__name__}: {err}".splitlines()[0])
        raise


def _run_steps(ctx: dict[str, Any], monitor_run: str | None) -> dict[str, Any]:
    cfg = config_of(ctx)
    result: dict[str, Any] = {"context": ctx}
    result["ingest"] = ingest(ctx)
    result["validate"] = validate(ctx)
    result["split"] = split(ctx)
    result["fit_scaler"] = fit_scaler(ctx)
    result["pretrain"] = [pretrain_layer(ctx, k) for k in range(1, cfg.n_layers + 1)]
    result["finetune"] = finetune(ctx)
    result["evaluate"] = evaluate(ctx)
    result["register"] = register(ctx, monitor_run)
    result["promote"] = promote(ctx, result["register"])
    return result
