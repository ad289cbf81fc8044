"""Choosing hyperparameters the way practitioners do: by validation probe accuracy.

``select_hyperparameters`` works on arrays without Airflow; the training DAG maps
``steps.try_candidate`` over the config's candidates and ``steps.select_candidate`` keeps the
winner. Both score a candidate with ``score_candidate``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from sae_pipeline.config import PipelineConfig
from sae_pipeline.engine.evaluation import probe_accuracy


def estimator_params(cfg: PipelineConfig) -> dict[str, Any]:
    """``StackedAutoencoder`` keyword arguments equal to a pipeline config's model/training."""
    m, pre, fine = cfg.model, cfg.training.pretrain, cfg.training.finetune
    return {
        "hidden_dims": tuple(m.hidden_dims),
        "activation": m.activation,
        "code_activation": m.code_activation,
        "output_activation": cfg.output_activation(),
        "dropout": m.dropout,
        "batch_norm": m.batch_norm,
        "tied_weights": m.tied_weights,
        "noise": m.noise,
        "noise_level": m.noise_level,
        "sparsity": m.sparsity,
        "sparsity_weight": m.sparsity_weight,
        "sparsity_target": m.sparsity_target,
        "optimizer": fine.optimizer,
        "batch_size": fine.batch_size,
        "weight_decay": fine.weight_decay,
        "pretrain_epochs": pre.epochs,
        "pretrain_learning_rate": pre.learning_rate,
        "finetune_epochs": fine.epochs,
        "finetune_learning_rate": fine.learning_rate,
        "lr_schedule": fine.lr_schedule,
        "patience": fine.patience,
        "device": cfg.training.device,
        "amp": cfg.training.amp,
        "random_state": cfg.training.seed,
    }


def score_candidate(
    params: dict[str, Any],
    x_train: np.ndarray,
    x_val: np.ndarray,
    y_train: np.ndarray | None,
    y_val: np.ndarray | None,
    probe_max_iter: int = 5000,
) -> dict[str, float]:
    """Fit an SAE with ``params`` on the training part; score it on the validation part."""
    from sae_pipeline.engine.estimator import StackedAutoencoder

    sae = StackedAutoencoder(**params).fit(x_train)
    scores = {"val_mse": float(np.mean(sae.reconstruction_error(x_val)))}
    if y_train is not None and y_val is not None:
        scores["probe_accuracy"] = probe_accuracy(
            sae.transform(x_train), y_train, sae.transform(x_val), y_val, probe_max_iter
        )
    return scores


def better(a: dict[str, float], b: dict[str, float] | None, metric: str) -> bool:
    """Whether scores ``a`` beat ``b``: higher probe accuracy (ties: lower MSE), or lower MSE."""
    if b is None:
        return True
    by_accuracy = metric == "probe_accuracy" and "probe_accuracy" in a
    if by_accuracy and a["probe_accuracy"] != b["probe_accuracy"]:
        return a["probe_accuracy"] > b["probe_accuracy"]
    return a["val_mse"] < b["val_mse"]


def select_hyperparameters(
    X: np.ndarray,
    y: np.ndarray | None,
    candidates: list[dict[str, Any]],
    base: dict[str, Any] | None = None,
    validation_fraction: float = 0.25,
    random_state: int = 0,
    metric: str = "probe_accuracy",
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Score each candidate (``StackedAutoencoder`` params over ``base``) on a held-out part.

    Returns the winning parameters and one row per candidate (its params and scores).
    """
    from sklearn.model_selection import train_test_split

    X = np.asarray(X, dtype=np.float32)
    stratify = y if y is not None and np.unique(y, return_counts=True)[1].min() >= 2 else None
    parts = train_test_split(
        X,
        *([] if y is None else [y]),
        test_size=validation_fraction,
        random_state=random_state,
        stratify=stratify,
    )
    x_tr, x_val = parts[0], parts[1]
    y_tr, y_val = (parts[2], parts[3]) if y is not None else (None, None)
    rows, best, best_scores = [], None, None
    for cand in candidates:
        params = {**(base or {}), **cand}
        scores = score_candidate(params, x_tr, x_val, y_tr, y_val)
        rows.append({"params": cand, **scores})
        if better(scores, best_scores, metric):
            best, best_scores = params, scores
    return best, rows
