"""The training DAG's anomaly step (``anomaly.enabled``): fit, evaluate and store the detector.

``fit_anomaly`` fits ``SAEAnomalyDetector`` on the training part, its threshold at the
``anomaly.contamination`` quantile of the training rows' scores, and stores its state as plain
data (``anomaly/detector.json`` + ``detector.npz``) for ``register`` to put in the encoder
bundle. When the data's label column marks anomalies (``anomaly.anomaly_label``) and the test
part holds both kinds, it logs ROC AUC and PR AUC on the test part for the detector, for
IsolationForest fitted on the same rows, and for the SAE's own reconstruction error.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from sae_pipeline import storage
from sae_pipeline.steps._run import _uri, config_of
from sae_pipeline.steps._training_data import _dataset, _scaled

log = logging.getLogger(__name__)


def anomaly_labels(y: np.ndarray | None, label: int | str) -> np.ndarray | None:
    """1 where ``y`` equals ``label`` (numbers compared as numbers), else 0; None without y."""
    if y is None:
        return None
    y = np.asarray(y)
    if y.dtype.kind in "iuf" and not isinstance(label, str):
        return (y == label).astype(int)
    return (y.astype(str) == str(label)).astype(int)


def detector_state(ctx: dict[str, Any]) -> tuple[dict, dict[str, np.ndarray]] | None:
    """The run's fitted detector as (metadata, arrays), or None when none was fitted."""
    meta_uri = _uri(ctx, "anomaly", "detector.json")
    if not storage.exists(meta_uri):
        return None
    return storage.read_json(meta_uri), storage.read_arrays(_uri(ctx, "anomaly", "detector.npz"))


def fit_anomaly(ctx: dict[str, Any], net) -> dict[str, Any]:
    """Fit the detector on the training part, store it, log its metrics; idempotent.

    ``net``: the run's trained network, whose reconstruction error is measured alongside."""
    from sae_pipeline.engine.anomaly import SAEAnomalyDetector
    from sae_pipeline.registry import tracking

    cfg = config_of(ctx)
    out = _uri(ctx, "anomaly", "metrics.json")
    if storage.exists(out):
        return storage.read_json(out)
    a = cfg.anomaly
    data = _dataset(ctx)
    x_train = data["x_train"]
    det = SAEAnomalyDetector(
        n_estimators=a.n_estimators,
        max_samples=a.max_samples,
        epochs=a.epochs,
        isolation_weight=a.isolation_weight,
        contamination=a.contamination,
        random_state=cfg.training.seed,
    ).fit(x_train)
    meta, arrays = det.to_state()
    flagged = float(np.mean(det.predict(x_train) == -1))
    meta["expected_share"] = flagged  # what the drift monitor expects of a new batch
    metrics: dict[str, Any] = {"anomaly_train_flagged_share": flagged}
    y_test = anomaly_labels(data["y_test"], a.anomaly_label)
    if y_test is not None and 0 < y_test.sum() < len(y_test):
        metrics |= _evaluate(ctx, det, net, data, y_test, cfg.training.seed)
    storage.write_arrays(_uri(ctx, "anomaly", "detector.npz"), **arrays)
    storage.write_json(_uri(ctx, "anomaly", "detector.json"), meta)
    tracking.log_metrics(cfg, ctx["mlflow_run_id"], metrics)
    storage.write_json(out, metrics)  # last: its presence means the step is done
    log.info("anomaly: %s", metrics)
    return metrics


def _evaluate(ctx, det, net, data, y_test: np.ndarray, seed: int) -> dict[str, float]:
    """ROC AUC and PR AUC on the test part: the detector, IsolationForest, the SAE's error."""
    from sklearn.ensemble import IsolationForest
    from sklearn.metrics import average_precision_score, roc_auc_score

    from sae_pipeline.engine import trainer

    x_train, x_test = data["x_train"], data["x_test"]
    scaled = _scaled(ctx, data)["test"]
    recon = trainer.reconstruct_array(net, scaled)
    scores = {  # higher = more anomalous
        "detector": -det.score_samples(x_test),
        "iforest": -IsolationForest(random_state=seed).fit(x_train).score_samples(x_test),
        "sae_error": np.mean((recon - scaled) ** 2, axis=1),
    }
    metrics = {"anomaly_test_rows": float(len(y_test)), "anomaly_test_share": float(y_test.mean())}
    for name, s in scores.items():
        metrics[f"anomaly_{name}_roc_auc"] = float(roc_auc_score(y_test, s))
        metrics[f"anomaly_{name}_pr_auc"] = float(average_precision_score(y_test, s))
    return metrics
