"""Training steps on the network: candidates, greedy pretraining of each layer, fine-tuning."""

from __future__ import annotations

import json
import logging
from typing import Any

from sae_pipeline import storage
from sae_pipeline.config import PipelineConfig, build_config
from sae_pipeline.steps._run import _uri, config_of
from sae_pipeline.steps._training_data import _dataset, _scaled

log = logging.getLogger(__name__)


# ---- hyperparameter selection -----------------------------------------------------------------
def _candidate_key(candidate: dict[str, Any]) -> str:
    import hashlib

    return hashlib.sha256(json.dumps(candidate, sort_keys=True).encode()).hexdigest()[:12]


def try_candidate(ctx: dict[str, Any], candidate: dict[str, Any]) -> dict[str, Any]:
    """Train one candidate on the training part, score it on the validation part, record it."""
    from sae_pipeline.engine.selection import estimator_params, score_candidate
    from sae_pipeline.registry import tracking

    out = _uri(ctx, "selection", f"candidate_{_candidate_key(candidate)}.json")
    if storage.exists(out):
        return storage.read_json(out)
    base = config_of(ctx)
    cfg = build_config(base.model_dump(mode="json"), candidate)
    data = _dataset(ctx)
    scaled = _scaled(ctx, data)
    scores = score_candidate(
        estimator_params(cfg),
        scaled["train"],
        scaled["val"],
        data["y_train"],
        data["y_val"],
        cfg.evaluation.probe_max_iter,
    )
    child = tracking.child_run(
        base, ctx["mlflow_run_id"], f"candidate {_candidate_key(candidate)}", candidate, scores
    )
    result = {"candidate": candidate, "mlflow_run_id": child, **scores}
    storage.write_json(out, result)
    return result


def select_candidate(ctx: dict[str, Any], results: list[dict[str, Any]]) -> dict[str, Any]:
    """Keep the best candidate: its config becomes the run's config for the steps that follow."""
    from sae_pipeline.engine.selection import better
    from sae_pipeline.registry import tracking

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
    from sae_pipeline.engine.net import Architecture

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
    from sae_pipeline.engine.net import build_net

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
    """Log a phase's per-epoch losses and its device to MLflow, keep them beside its outputs,
    summarise it."""
    from sae_pipeline.engine.device import describe
    from sae_pipeline.registry import tracking

    tracking.set_run_tags(cfg, ctx["mlflow_run_id"], {f"sae.device.{prefix}": describe(device)})
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


def _input_dim(ctx: dict[str, Any]) -> int:
    return len(
        storage.read_json(_uri(ctx, "validate", "manifest.json"))["contract"]["feature_columns"]
    )


def _training_rows(ctx, cfg: PipelineConfig, phase, seed: int, device):
    """(training rows, validation rows, extra trainer arguments) of a phase: the scaled parts
    as tensors in memory, or a ``ShardStream`` and a validation sample when streamed."""
    from sae_pipeline.engine import trainer
    from sae_pipeline.steps import _training_stream as ts

    if ts.streamed(ctx):
        stream, x_val = ts.train_stream(ctx, cfg, phase.batch_size, seed, device)
        log.info(
            "training streamed: %d rows, batch %d, budget %d steps",
            stream.rows,
            stream.batch,
            trainer.step_budget(phase, stream.rows, stream.batch, True),
        )
        every = cfg.training.checkpoint_every_steps
        return None, x_val, {"stream": stream, "checkpoint_every_steps": every}
    scaled = storage.read_arrays(_uri(ctx, "scaler", "scaled.npz"))
    log.info("training in memory: %d rows", len(scaled["train"]))
    x_train, x_val = (trainer.as_tensor(scaled[p], device) for p in ("train", "val"))
    return x_train, x_val, {}


def pretrain_layer(ctx: dict[str, Any], layer: int) -> dict[str, Any]:
    """Greedy step for ``layer`` (1-based): train it on the codes of frozen layers below."""
    from sae_pipeline.engine import trainer

    cfg = config_of(ctx)
    out = _uri(ctx, "pretrain", f"layer_{layer}.pt")
    if storage.exists(out):
        return storage.read_torch(out)["summary"]
    device = trainer.resolve_device(cfg.training.device)
    seed = cfg.training.seed + layer
    x_train, x_val, extra = _training_rows(ctx, cfg, cfg.training.pretrain, seed, device)
    net = _stack(ctx, cfg, _input_dim(ctx), layer - 1).to(device)
    checkpoint = _epoch_checkpoint(ctx, cfg, "pretrain", f"layer_{layer}.ckpt")
    hist = trainer.pretrain_layer(
        net,
        layer - 1,
        x_train,
        x_val,
        cfg.training.pretrain,
        cfg.model,
        seed=seed,
        amp=cfg.training.amp,
        checkpoint=checkpoint,
        **extra,
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

    from sae_pipeline.engine import trainer
    from sae_pipeline.engine.net import net_blob

    cfg = config_of(ctx)
    out = _uri(ctx, "finetune", "model.pt")
    summary_uri = _uri(ctx, "finetune", "summary.json")
    if storage.exists(summary_uri):
        return storage.read_json(summary_uri)
    device = trainer.resolve_device(cfg.training.device)
    seed = cfg.training.seed + 1000
    x_train, x_val, extra = _training_rows(ctx, cfg, cfg.training.finetune, seed, device)
    net = _stack(ctx, cfg, _input_dim(ctx), cfg.n_layers)
    pretrained = _uri(ctx, "finetune", "pretrained.pt")
    if not storage.exists(pretrained):
        storage.write_torch(pretrained, net_blob(net))
    net = net.to(device)
    checkpoint = _epoch_checkpoint(ctx, cfg, "finetune", "finetune.ckpt")
    hist = trainer.finetune(
        net,
        x_train,
        x_val,
        cfg.training.finetune,
        cfg.model,
        seed=seed,
        amp=cfg.training.amp,
        checkpoint=checkpoint,
        **extra,
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
    from sae_pipeline.engine.net import load_net

    return load_net(storage.read_torch(_uri(ctx, "finetune", f"{which}.pt")))


def load_encoder(ctx: dict[str, Any]):
    """The run's trained ``Encoder``: contract, fitted scaler, fine-tuned network and (with
    ``anomaly.enabled``) the fitted anomaly detector."""
    from sae_pipeline.data.contract import Contract
    from sae_pipeline.data.scaling import from_state
    from sae_pipeline.engine.encoder import Encoder
    from sae_pipeline.steps._training_anomaly import detector_state

    manifest = storage.read_json(_uri(ctx, "validate", "manifest.json"))
    return Encoder(
        Contract.from_dict(manifest["contract"]),
        from_state(storage.read_json(_uri(ctx, "scaler", "scaler.json"))),
        load_trained(ctx),
        detector_state(ctx),
    )
