"""Pipeline steps: plain Python, no Airflow. A DAG task and a CLI command call one step each.

Every step takes ``ctx`` (the small dict ``prepare`` returns: run key, config URI, MLflow run
id), reads its inputs from the run's folder in the artifact store, writes its outputs there
atomically, and returns a small JSON-able dict. A step whose output already exists returns it
instead of redoing the work, so retries and re-runs neither duplicate nor change results.
"""

from __future__ import annotations

import json
import logging
import subprocess
from pathlib import Path
from typing import Any

from sae_pipeline import storage
from sae_pipeline.config import PipelineConfig, build_config, load_config

log = logging.getLogger(__name__)

__all__ = [
    "evaluate",
    "finetune",
    "fit_scaler",
    "ingest",
    "prepare",
    "pretrain_layer",
    "promote",
    "register",
    "select_candidate",
    "split",
    "try_candidate",
    "validate",
]


def code_version() -> str:
    """Package version plus the git commit when running from a checkout."""
    from sae_pipeline import __version__

    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"],
            cwd=Path(__file__).parent,
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        sha = ""
    return f"{__version__}+{sha}" if sha else __version__


def config_of(ctx: dict[str, Any]) -> PipelineConfig:
    return build_config(storage.read_json(ctx["config_uri"]))


def _uri(ctx: dict[str, Any], *parts: str) -> str:
    return storage.join(ctx["run_dir"], *parts)


# ---- prepare ----------------------------------------------------------------------------------
def prepare(
    run_id: str,
    config_path: str | None = None,
    overrides: dict[str, Any] | None = None,
    expected_layers: int | None = None,
) -> dict[str, Any]:
    """Validate the config once, store it with the run, and open (or find) the MLflow run."""
    from sae_pipeline import tracking

    cfg = load_config(config_path, **(overrides or {}))
    if expected_layers is not None and cfg.n_layers != expected_layers:
        from sae_pipeline.errors import ConfigError

        raise ConfigError(
            f"invalid config: model.hidden_dims has {cfg.n_layers} layer(s) but this DAG was "
            f"built for {expected_layers}; set SAE_CONFIG to a config with that many layers"
        )
    # Resolve the store and the tracking URI now, so every task on every worker uses the same.
    cfg = cfg.model_copy(
        update={
            "artifacts_root": storage.normalize_root(cfg.artifacts_root),
            "registry": cfg.registry.model_copy(
                update={"tracking_uri": tracking.tracking_uri(cfg)}
            ),
        }
    )
    key = storage.run_key(run_id)
    run_dir = storage.run_dir(cfg.artifacts_root, key)
    config_uri = storage.join(run_dir, "config.json")
    storage.write_json(config_uri, cfg.model_dump(mode="json"))
    mlflow_run_id = tracking.find_or_create_run(
        cfg,
        key,
        tags={
            "sae.dag_run_id": run_id,
            "sae.config_hash": cfg.config_hash(),
            "sae.code_version": code_version(),
        },
    )
    log.info("run %s: MLflow run %s, artifacts %s", key, mlflow_run_id, run_dir)
    return {
        "run_key": key,
        "run_id": run_id,
        "run_dir": run_dir,
        "config_uri": config_uri,
        "mlflow_run_id": mlflow_run_id,
        "tracking_uri": cfg.registry.tracking_uri,
    }


# ---- data -------------------------------------------------------------------------------------
def ingest(ctx: dict[str, Any]) -> dict[str, Any]:
    """Read the source once and keep it, as read, as the run's raw copy; the source is only read."""
    from sae_pipeline.data import content_hash
    from sae_pipeline.snapshot import parquet_bytes, parquet_safe
    from sae_pipeline.sources import describe_source, read_source, source_format

    cfg = config_of(ctx)
    out = _uri(ctx, "ingest", "raw.parquet")
    manifest_uri = _uri(ctx, "ingest", "manifest.json")
    if storage.exists(manifest_uri):
        return storage.read_json(manifest_uri)
    frame = parquet_safe(read_source(cfg.data))
    storage.write_bytes(out, parquet_bytes(frame))
    manifest = {
        "raw": out,
        "rows_in": len(frame),
        "raw_hash": content_hash(frame),
        "source": describe_source(cfg.data.source),
        "source_format": source_format(cfg.data),
    }
    storage.write_json(manifest_uri, manifest)
    log.info("ingested %d rows from %s", len(frame), manifest["source"])
    return manifest


def validate(ctx: dict[str, Any]) -> dict[str, Any]:
    """Validate the raw copy against the data contract (the configured one, or one recorded now).

    Writes the snapshot folder ``validate/`` exactly as ``sae-pipeline ingest`` does: accepted
    rows, quarantined rows with their reasons, and ``manifest.json`` (counts, content hash,
    contract). Rows in, accepted and quarantined go to the log and to MLflow.
    """
    from sae_pipeline import snapshot

    cfg = config_of(ctx)
    out_dir = _uri(ctx, "validate")
    if storage.exists(storage.join(out_dir, snapshot.MANIFEST)):
        return snapshot.summary(snapshot.read_manifest(out_dir), out_dir)
    raw = storage.read_json(_uri(ctx, "ingest", "manifest.json"))
    frame = storage.read_parquet(raw["raw"])
    contract = snapshot.load_contract(cfg.data.contract) if cfg.data.contract else None
    manifest = snapshot.write_snapshot(
        frame,
        cfg.data,
        out_dir,
        contract,
        source=raw.get("source"),
        source_format=raw.get("source_format"),
    )
    result = snapshot.summary(manifest, out_dir)
    log.info(
        "validated %d rows in: %d accepted, %d quarantined; snapshot %s",
        result["rows_in"],
        result["rows_accepted"],
        result["rows_quarantined"],
        result["content_hash"],
    )
    if result["rows_quarantined"]:
        log.warning(
            "%d of %d rows quarantined (%s): %s",
            result["rows_quarantined"],
            result["rows_in"],
            result["quarantine"],
            "; ".join(p["message"] for p in manifest["problems"]),
        )
    for warning in manifest["warnings"]:
        log.warning("%s", warning)
    _track_snapshot(ctx, cfg, result)
    return result


def _track_snapshot(ctx: dict[str, Any], cfg: PipelineConfig, result: dict[str, Any]) -> None:
    """Counts as metrics, the content hash as a tag, manifest and quarantine as artifacts."""
    import tempfile

    from sae_pipeline import tracking

    counts = {k: result[k] for k in ("rows_in", "rows_accepted", "rows_quarantined")}
    tracking.log_metrics(cfg, ctx["mlflow_run_id"], counts)
    tracking.set_run_tags(cfg, ctx["mlflow_run_id"], {"sae.data_hash": result["content_hash"]})
    with tempfile.TemporaryDirectory() as tmp:
        for uri in (result["manifest"], result["quarantine"]):
            if uri:
                local = Path(tmp) / uri.rsplit("/", 1)[-1]
                local.write_bytes(storage.read_bytes(uri))
                tracking.log_artifact_file(cfg, ctx["mlflow_run_id"], str(local), "data")


def split(ctx: dict[str, Any]) -> dict[str, Any]:
    """Deterministic train/validation/test split of the accepted rows."""
    from sae_pipeline.data import split_indices

    cfg = config_of(ctx)
    out = _uri(ctx, "split", "indices.npz")
    if not storage.exists(out):
        from sae_pipeline.snapshot import read_manifest, read_snapshot

        manifest = read_manifest(_uri(ctx, "validate"))
        frame = read_snapshot(_uri(ctx, "validate"), verify=True)
        label = manifest["contract"]["label_column"]
        labels = frame[label].to_numpy() if label else None
        storage.write_arrays(out, **split_indices(len(frame), labels, cfg.split))
    idx = storage.read_arrays(out)
    return {"indices": out, **{f"rows_{k}": len(v) for k, v in idx.items()}}


def _dataset(ctx: dict[str, Any]) -> dict[str, Any]:
    """Features and labels of each part, unscaled, from the snapshot and the split."""
    import numpy as np

    from sae_pipeline.snapshot import read_manifest, read_snapshot

    manifest = read_manifest(_uri(ctx, "validate"))
    contract = manifest["contract"]
    frame = read_snapshot(_uri(ctx, "validate"))
    idx = storage.read_arrays(_uri(ctx, "split", "indices.npz"))
    x = frame[contract["feature_columns"]].to_numpy(dtype=np.float64)
    y = frame[contract["label_column"]].to_numpy() if contract["label_column"] else None
    data: dict[str, Any] = {"frame": frame, "contract": contract}
    for part, ix in idx.items():
        data[f"x_{part}"] = x[ix]
        data[f"y_{part}"] = y[ix] if y is not None else None
    return data


def fit_scaler(ctx: dict[str, Any]) -> dict[str, Any]:
    """Fit the scaler on the training part only and store it with the scaled parts."""
    from sae_pipeline.scaling import apply_scaler
    from sae_pipeline.scaling import fit_scaler as fit

    cfg = config_of(ctx)
    scaler_uri, scaled_uri = _uri(ctx, "scaler", "scaler.joblib"), _uri(ctx, "scaler", "scaled.npz")
    if not storage.exists(scaled_uri):
        data = _dataset(ctx)
        scaler = fit(cfg.scaler.kind, data["x_train"])
        storage.write_pickle(scaler_uri, scaler)
        storage.write_arrays(
            scaled_uri,
            **{p: apply_scaler(scaler, data[f"x_{p}"]) for p in ("train", "val", "test")},
        )
    return {"scaler": scaler_uri, "scaled": scaled_uri, "kind": cfg.scaler.kind}


# ---- hyperparameter selection -----------------------------------------------------------------
def _candidate_key(candidate: dict[str, Any]) -> str:
    import hashlib

    return hashlib.sha256(json.dumps(candidate, sort_keys=True).encode()).hexdigest()[:12]


def try_candidate(ctx: dict[str, Any], candidate: dict[str, Any]) -> dict[str, Any]:
    """Train one candidate on the training part, score it on the validation part, record it."""
    from sae_pipeline import tracking
    from sae_pipeline.selection import estimator_params, score_candidate

    out = _uri(ctx, "selection", f"candidate_{_candidate_key(candidate)}.json")
    if storage.exists(out):
        return storage.read_json(out)
    base = config_of(ctx)
    cfg = build_config(base.model_dump(mode="json"), candidate)
    scaled = storage.read_arrays(_uri(ctx, "scaler", "scaled.npz"))
    data = _dataset(ctx)
    scores = score_candidate(
        estimator_params(cfg),
        scaled["train"],
        scaled["val"],
        data["y_train"],
        data["y_val"],
        cfg.evaluation.probe_max_iter,
    )
    child = tracking.child_run(
        base, ctx["mlflow_run_id"], f"candidate {_candidate_key(candidate)}", candidate
    )
    tracking.log_metrics(base, child, scores)
    result = {"candidate": candidate, "mlflow_run_id": child, **scores}
    storage.write_json(out, result)
    return result


def select_candidate(ctx: dict[str, Any], results: list[dict[str, Any]]) -> dict[str, Any]:
    """Keep the best candidate: its config becomes the run's config for the steps that follow."""
    from sae_pipeline import tracking
    from sae_pipeline.selection import better

    cfg = config_of(ctx)
    best = None
    for r in results:
        if best is None or better(r, best, cfg.selection.metric):
            best = r
    selected = build_config(cfg.model_dump(mode="json"), best["candidate"])
    config_uri = _uri(ctx, "selection", "config.json")
    storage.write_json(config_uri, selected.model_dump(mode="json"))
    storage.write_json(_uri(ctx, "selection", "results.json"), results)
    tracking.set_run_tags(
        cfg,
        ctx["mlflow_run_id"],
        {"sae.selection.winner": json.dumps(best["candidate"], sort_keys=True)},
    )
    tracking.log_metrics(
        cfg,
        ctx["mlflow_run_id"],
        {f"selection_best_{k}": best[k] for k in ("probe_accuracy", "val_mse") if k in best},
    )
    log.info("selected %s out of %d candidates", best["candidate"], len(results))
    return {**ctx, "config_uri": config_uri, "selected": best["candidate"]}


# ---- training ---------------------------------------------------------------------------------
def architecture(cfg: PipelineConfig, input_dim: int):
    from sae_pipeline.model import Architecture

    m = cfg.model
    return Architecture(
        input_dim=input_dim,
        hidden_dims=list(m.hidden_dims),
        activation=m.activation,
        code_activation=m.code_activation,
        output_activation=cfg.output_activation(),
        dropout=m.dropout,
        batch_norm=m.batch_norm,
        tied_weights=m.tied_weights,
    )


def _layer_state(net, k: int) -> dict[str, Any]:
    prefixes = (f"encoders.{k}.", f"decoders.{k}.", f"norms.{k}.", f"decoder_biases.{k}")
    return {n: t for n, t in net.state_dict().items() if n.startswith(prefixes)}


def _stack(ctx: dict[str, Any], cfg: PipelineConfig, input_dim: int, layers: int):
    """A network with the pretrained weights of layers 0..layers-1 loaded."""
    from sae_pipeline.model import build_net

    net = build_net(architecture(cfg, input_dim), seed=cfg.training.seed)
    for j in range(layers):
        state = storage.read_torch(_uri(ctx, "pretrain", f"layer_{j + 1}.pt"))["state_dict"]
        net.load_state_dict(state, strict=False)
    return net


def _epoch_checkpoint(ctx: dict[str, Any], cfg: PipelineConfig, step: str, name: str):
    """Where a phase checkpoints its epochs: a local file (resume needs a real file), or None
    when the artifact store is remote."""
    if not storage.is_local(cfg.artifacts_root):
        return None
    path = storage.local_path(_uri(ctx, step, name))
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def _record_phase(ctx, cfg, prefix: str, history_uri: str, hist, device) -> dict[str, Any]:
    """Log a phase's per-epoch losses to MLflow, keep them beside its outputs, summarise it."""
    from sae_pipeline import tracking

    tracking.log_history(cfg, ctx["mlflow_run_id"], prefix, hist.to_dict())
    storage.write_json(history_uri, hist.to_dict())
    tracking.log_metrics(cfg, ctx["mlflow_run_id"], {f"{prefix}_best_val_loss": hist.best_val_loss})
    return {
        "epochs_run": len(hist.val_loss),
        "best_epoch": hist.best_epoch + 1,
        "best_val_loss": hist.best_val_loss,
        "device": device.type,
        "seconds": round(hist.seconds, 3),
    }


def pretrain_layer(ctx: dict[str, Any], layer: int) -> dict[str, Any]:
    """Greedy step for ``layer`` (1-based): train it on the codes of frozen layers below."""
    from sae_pipeline import trainer

    cfg = config_of(ctx)
    out = _uri(ctx, "pretrain", f"layer_{layer}.pt")
    if storage.exists(out):
        return storage.read_torch(out)["summary"]
    device = trainer.resolve_device(cfg.training.device)
    scaled = storage.read_arrays(_uri(ctx, "scaler", "scaled.npz"))
    net = _stack(ctx, cfg, scaled["train"].shape[1], layer - 1).to(device)
    checkpoint = _epoch_checkpoint(ctx, cfg, "pretrain", f"layer_{layer}.ckpt")
    hist = trainer.pretrain_layer(
        net,
        layer - 1,
        trainer.as_tensor(scaled["train"], device),
        trainer.as_tensor(scaled["val"], device),
        cfg.training.pretrain,
        cfg.model,
        seed=cfg.training.seed + layer,
        amp=cfg.training.amp,
        checkpoint=checkpoint,
    )
    history_uri = _uri(ctx, "pretrain", f"layer_{layer}_history.json")
    summary = {
        "layer": layer,
        "checkpoint": out,
        **_record_phase(ctx, cfg, f"pretrain_layer{layer}", history_uri, hist, device),
    }
    net = net.cpu()
    storage.write_torch(out, {"state_dict": _layer_state(net, layer - 1), "summary": summary})
    if checkpoint is not None:
        checkpoint.unlink(missing_ok=True)
    return summary


def finetune(ctx: dict[str, Any]) -> dict[str, Any]:
    """Stack the pretrained layers and fine-tune the whole autoencoder end to end."""
    import torch

    from sae_pipeline import trainer
    from sae_pipeline.model import net_blob

    cfg = config_of(ctx)
    out = _uri(ctx, "finetune", "model.pt")
    summary_uri = _uri(ctx, "finetune", "summary.json")
    if storage.exists(summary_uri):
        return storage.read_json(summary_uri)
    device = trainer.resolve_device(cfg.training.device)
    scaled = storage.read_arrays(_uri(ctx, "scaler", "scaled.npz"))
    net = _stack(ctx, cfg, scaled["train"].shape[1], cfg.n_layers)
    pretrained = _uri(ctx, "finetune", "pretrained.pt")
    if not storage.exists(pretrained):
        storage.write_torch(pretrained, net_blob(net))
    net = net.to(device)
    checkpoint = _epoch_checkpoint(ctx, cfg, "finetune", "finetune.ckpt")
    hist = trainer.finetune(
        net,
        trainer.as_tensor(scaled["train"], device),
        trainer.as_tensor(scaled["val"], device),
        cfg.training.finetune,
        cfg.model,
        seed=cfg.training.seed + 1000,
        amp=cfg.training.amp,
        checkpoint=checkpoint,
    )
    summary = {
        "model": out,
        "pretrained": pretrained,
        **_record_phase(ctx, cfg, "finetune", _uri(ctx, "finetune", "history.json"), hist, device),
        "torch": torch.__version__,
    }
    storage.write_torch(out, net_blob(net.cpu()))
    storage.write_json(summary_uri, summary)
    if checkpoint is not None:
        checkpoint.unlink(missing_ok=True)
    return summary


def load_trained(ctx: dict[str, Any], which: str = "model"):
    """The fine-tuned (``model``) or pretrain-only (``pretrained``) network of a run."""
    from sae_pipeline.model import load_net

    return load_net(storage.read_torch(_uri(ctx, "finetune", f"{which}.pt")))


def load_encoder(ctx: dict[str, Any]):
    """The run's trained ``Encoder``: contract, fitted scaler and fine-tuned network."""
    from sae_pipeline.data import Contract
    from sae_pipeline.serving import Encoder

    manifest = storage.read_json(_uri(ctx, "validate", "manifest.json"))
    return Encoder(
        Contract.from_dict(manifest["contract"]),
        storage.read_pickle(_uri(ctx, "scaler", "scaler.joblib")),
        load_trained(ctx),
    )


# ---- evaluation and registry ------------------------------------------------------------------
def evaluate(ctx: dict[str, Any]) -> dict[str, Any]:
    """Test reconstruction and probe accuracy: SAE codes vs raw features vs PCA."""
    from sae_pipeline import tracking, trainer
    from sae_pipeline.evaluation import evaluate_features, reconstruction_errors

    cfg = config_of(ctx)
    out = _uri(ctx, "evaluate", "metrics.json")
    if storage.exists(out):
        return storage.read_json(out)
    scaled = storage.read_arrays(_uri(ctx, "scaler", "scaled.npz"))
    data = _dataset(ctx)
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

    from sae_pipeline import plots, tracking, trainer

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


def register(ctx: dict[str, Any]) -> dict[str, Any]:
    """Register encoder bundle and scaler as new versions and give them the alias challenger."""
    from sae_pipeline import tracking

    cfg = config_of(ctx)
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
    }
    versions = tracking.register_encoder(
        cfg, ctx["mlflow_run_id"], ctx["run_key"], encoder, example, lineage
    )
    names = {"encoder": cfg.registry.encoder_model_name, "scaler": cfg.registry.scaler_model_name}
    for role, name in names.items():
        tracking.set_alias(cfg, name, tracking.CHALLENGER, versions[role])
    return {
        "encoder_model_name": names["encoder"],
        "scaler_model_name": names["scaler"],
        "encoder_version": versions["encoder"],
        "scaler_version": versions["scaler"],
    }


def gate_decision(
    challenger: dict[str, float], champion: dict[str, float] | None, cfg: PipelineConfig
) -> tuple[bool, str]:
    """Whether the challenger may replace the champion, and why (pure: no MLflow here)."""
    if champion is None:
        return True, "no champion yet"
    gate = cfg.registry.gate
    reasons = []
    ch_acc, cur_acc = challenger.get("probe_accuracy_sae"), champion.get("probe_accuracy_sae")
    comparable = ch_acc is not None and cur_acc is not None
    if comparable and ch_acc < cur_acc - gate.max_probe_accuracy_drop - 1e-12:
        reasons.append(
            f"probe accuracy {ch_acc:.4f} is below the champion's {cur_acc:.4f}"
            f" (allowed drop {gate.max_probe_accuracy_drop:g})"
        )
    ch_mse, cur_mse = challenger["test_mse"], champion["test_mse"]
    limit = cur_mse * (1.0 - gate.min_relative_mse_improvement)
    if not ch_mse < limit:
        reasons.append(f"test MSE {ch_mse:.6f} is not below {limit:.6f} (champion {cur_mse:.6f})")
    if reasons:
        return False, "; ".join(reasons)
    acc = f", probe accuracy {ch_acc:.4f} vs {cur_acc:.4f}" if ch_acc is not None else ""
    return True, f"test MSE {ch_mse:.6f} < {cur_mse:.6f}{acc}"


def _common_evaluation(ctx: dict[str, Any], cfg: PipelineConfig, name: str, version: str):
    """Challenger and champion ``version`` measured on the challenger's test split:
    (challenger metrics, champion metrics, basis), or None when that is not possible."""
    import mlflow

    from sae_pipeline import comparison, tracking

    try:
        champion = comparison.registered_encoder(tracking.tracking_uri(cfg), name, version)
    except (mlflow.exceptions.MlflowException, OSError) as err:
        log.warning("gate: champion %s v%s cannot be loaded (%s)", name, version, err)
        return None
    return comparison.on_test_split(
        load_encoder(ctx), champion, _dataset(ctx), cfg.evaluation.probe_max_iter
    )


def promote(ctx: dict[str, Any], registered: dict[str, Any]) -> dict[str, Any]:
    """Make the challenger champion if it passes the gate; record the decision on the version."""
    from sae_pipeline import tracking

    cfg = config_of(ctx)
    c = tracking.client(cfg)
    enc_name, sc_name = registered["encoder_model_name"], registered["scaler_model_name"]
    version = registered["encoder_version"]
    challenger = storage.read_json(_uri(ctx, "evaluate", "metrics.json"))
    current = tracking.alias_version(c, enc_name, tracking.CHAMPION)
    champion_metrics = None
    if current is not None and str(current.version) == version:
        return {"promoted": True, "reason": "already champion", "champion_version": version}
    basis = "no champion to compare with"
    if current is not None:
        champion_metrics = c.get_run(current.run_id).data.metrics
        basis = "recorded metrics (the champion cannot run on the challenger's test rows)"
        common = _common_evaluation(ctx, cfg, enc_name, str(current.version))
        if common is not None:  # both models on the same rows: a fair comparison
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
    if promoted:
        tracking.set_alias(cfg, enc_name, tracking.CHAMPION, version)
        tracking.set_alias(cfg, sc_name, tracking.CHAMPION, registered["scaler_version"])
    tracking.set_run_tags(
        cfg, ctx["mlflow_run_id"], {"sae.gate.decision": decision, "sae.gate.reason": reason}
    )
    champion = version if promoted else (str(current.version) if current else None)
    log.info("gate: %s (%s); champion is version %s", decision, reason, champion)
    return {"promoted": promoted, "reason": reason, "champion_version": champion}
