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


def same_columns(challenger, champion) -> bool:
    """Whether both encoders read the same feature columns, in the same order."""
    return list(champion.contract.feature_columns) == list(challenger.contract.feature_columns)


def row_hashes(x: np.ndarray) -> np.ndarray:
    """One 64-bit content hash per row of a feature matrix (float64 values)."""
    import pandas as pd

    frame = pd.DataFrame(np.asarray(x, dtype=np.float64))
    return pd.util.hash_pandas_object(frame, index=False).to_numpy()


def trained_rows(snapshot, split: dict[str, Any] | None, features: list[str]) -> np.ndarray:
    """Hashes of the rows a model fitted or early-stopped on: its training and validation
    parts (every row of its snapshot when no split was stored)."""
    x = snapshot[features].to_numpy(dtype=np.float64)
    if split is not None:
        x = x[np.concatenate([split["train"], split["val"]])]
    return row_hashes(x)


def without_rows(data: dict[str, Any], seen: np.ndarray) -> tuple[dict[str, Any], int]:
    """``data`` with the test rows whose content is in ``seen`` left out; and how many were.

    After retraining on the champion's snapshot plus new rows, the challenger's test split holds
    rows the champion trained on, where the champion looks better than it is.
    """
    keep = ~np.isin(row_hashes(data["x_test"]), seen)
    out = {**data, "x_test": data["x_test"][keep]}
    if data.get("y_test") is not None:
        out["y_test"] = data["y_test"][keep]
    return out, int((~keep).sum())


def trained_among(ref, x: np.ndarray, features: list[str]) -> np.ndarray:
    """Which rows of ``x`` (by content) the registered version ``ref`` fitted or early-stopped
    on: the rows of its training and validation parts (every row of its snapshot when its run
    stored no split).

    Streams the version's snapshot one row group at a time and holds only the hashes of ``x``
    (a fixed-size sample on large data), so its memory does not grow with either snapshot.
    Rows are compared as float32 values, the precision streamed training reads.
    """
    from sae_pipeline import storage
    from sae_pipeline.data import batches, parts
    from sae_pipeline.registry import champion

    def hashes(rows: np.ndarray) -> np.ndarray:
        return row_hashes(np.asarray(rows, dtype=np.float32).astype(np.float64))

    found = np.zeros(len(x), dtype=bool)
    if not len(x):
        return found
    targets = hashes(x)
    snap = champion.snapshot_dir(ref)
    units = parts.units(parts.snapshot_files(snap, champion.validate_manifest(ref)))
    plan_uri = storage.join(ref.run_dir, "split", "plan.json")
    plan = storage.read_json(plan_uri) if storage.exists(plan_uri) else {"mode": "memory"}
    split, seen_rows = None, None
    if plan["mode"] == "stream":
        split = parts.HashSplit(**{k: v for k, v in plan["split"].items() if k != "method"})
    else:
        idx = champion.split_indices(ref)
        if idx is not None:
            seen_rows = np.zeros(sum(u.rows for u in units), dtype=bool)
            seen_rows[np.concatenate([idx["train"], idx["val"]])] = True
    for u in units:
        start = u.first_row
        for rb in batches.iter_chunks([u.file], features, 65_536, {u.file: [u.group]}):
            keep = np.ones(rb.num_rows, dtype=bool)
            if split is not None:
                keep = ~split.mask("test", start, rb.num_rows)
            elif seen_rows is not None:
                keep = seen_rows[start : start + rb.num_rows]
            start += rb.num_rows
            if keep.any():
                found |= np.isin(targets, hashes(batches.feature_matrix(rb, features)[keep]))
    return found


def without_mask(data: dict[str, Any], drop: np.ndarray) -> tuple[dict[str, Any], int]:
    """``data`` without the test rows ``drop`` marks; and how many were left out."""
    keep = ~drop
    out = {**data, "x_test": data["x_test"][keep]}
    if data.get("y_test") is not None:
        out["y_test"] = data["y_test"][keep]
    return out, int(drop.sum())


def on_test_split(
    challenger, champion, data: dict[str, Any], probe_max_iter: int = 5000, excluded: int = 0
) -> tuple[dict[str, float], dict[str, float], str] | None:
    """(challenger metrics, champion metrics, what they were measured on), or None when the
    champion reads other feature columns and cannot be run on these rows."""
    if not same_columns(challenger, champion):
        return None
    ours = measure(challenger, data, challenger.scaler, probe_max_iter)
    theirs = measure(champion, data, challenger.scaler, probe_max_iter)
    basis = f"both measured on {len(data['x_test'])} of the challenger's test rows"
    if excluded:
        basis += f" ({excluded} left out: the champion trained on them)"
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
