"""The promotion gate's fair comparison: challenger and champion measured on the same rows.

Each run records metrics on its own test split; after retraining on new data those splits
differ, so comparing recorded numbers compares data as much as models. Here both models are
measured on the challenger's test split (and their probes fitted on its training split):

- reconstruction MSE in the challenger's scaled space: the champion's reconstruction is mapped
  back to raw units with its own scaler and scaled like the challenger's, so a difference in
  scalers does not pass for a difference in models;
- probe accuracy of a logistic regression on each model's codes.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from sae_pipeline.config import PipelineConfig


def measure(
    encoder,
    data: dict[str, Any],
    space_scaler,
    probe_max_iter: int = 5000,
) -> dict[str, float]:
    """``test_mse``, ``test_mae`` (and ``probe_accuracy_sae``) of one encoder on ``data``.

    ``data`` holds raw ``x_train``, ``x_test`` and labels ``y_train``, ``y_test`` (or None);
    errors are measured in the space of ``space_scaler``.
    """
    from sae_pipeline.data.scaling import apply_scaler
    from sae_pipeline.engine.evaluation import probe_accuracy, reconstruction_errors
    from sae_pipeline.engine.trainer import encode_array, reconstruct_array

    x_test = apply_scaler(encoder.scaler, data["x_test"])
    recon = reconstruct_array(encoder.net, x_test)
    target = apply_scaler(space_scaler, data["x_test"])
    if encoder.scaler is not space_scaler:
        raw = encoder.scaler.inverse_transform(np.asarray(recon, dtype=np.float64))
        recon = apply_scaler(space_scaler, raw)
    err = reconstruction_errors(target, recon)
    metrics = {"test_mse": err["mse"], "test_mae": err["mae"]}
    y_train, y_test = data.get("y_train"), data.get("y_test")
    if y_train is not None and y_test is not None and len(np.unique(y_train)) > 1:
        metrics["probe_accuracy_sae"] = probe_accuracy(
            encode_array(encoder.net, apply_scaler(encoder.scaler, data["x_train"])),
            y_train,
            encode_array(encoder.net, x_test),
            y_test,
            probe_max_iter,
        )
    return metrics


def on_test_split(
    challenger, champion, data: dict[str, Any], probe_max_iter: int = 5000
) -> tuple[dict[str, float], dict[str, float], str] | None:
    """(challenger metrics, champion metrics, what they were measured on), or None when the
    champion reads other feature columns and cannot be run on these rows."""
    if list(champion.contract.feature_columns) != list(challenger.contract.feature_columns):
        return None
    ours = measure(challenger, data, challenger.scaler, probe_max_iter)
    theirs = measure(champion, data, challenger.scaler, probe_max_iter)
    basis = f"both measured on the challenger's test split ({len(data['x_test'])} rows)"
    return ours, theirs, basis


def registered_encoder(tracking_uri: str, name: str, version: str):
    """The ``Encoder`` of a registered version (as ``models:/<name>/<version>`` serves it)."""
    from sae_pipeline.registry.champion import _load

    return _load(tracking_uri, f"models:/{name}/{version}")


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
