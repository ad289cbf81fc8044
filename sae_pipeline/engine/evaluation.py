"""Quality of learned features: reconstruction error and downstream linear probes.

A probe is a logistic regression on standardized features, fitted on the training part and
scored on the test part. The SAE's codes are compared with the raw (scaled) features and with
PCA keeping as many components as the code has units.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from sklearn.decomposition import PCA
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler


def reconstruction_errors(x: np.ndarray, recon: np.ndarray) -> dict[str, float]:
    diff = np.asarray(recon, dtype=np.float64) - np.asarray(x, dtype=np.float64)
    return {"mse": float(np.mean(diff**2)), "mae": float(np.mean(np.abs(diff)))}


def probe_accuracy(
    f_train: np.ndarray, y_train: np.ndarray, f_test: np.ndarray, y_test: np.ndarray, max_iter: int
) -> float:
    """Test accuracy of a logistic-regression probe trained on ``f_train``."""
    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=max_iter))
    probe.fit(f_train, y_train)
    return float(probe.score(f_test, y_test))


def pca_baseline(x_train: np.ndarray, x_test: np.ndarray, n_components: int, seed: int = 0):
    """PCA with ``n_components``: (train features, test features, test reconstruction errors)."""
    k = min(n_components, x_train.shape[1], x_train.shape[0])
    pca = PCA(n_components=k, random_state=seed).fit(x_train)
    z_train, z_test = pca.transform(x_train), pca.transform(x_test)
    return z_train, z_test, reconstruction_errors(x_test, pca.inverse_transform(z_test))


def live_units(codes: np.ndarray, tol: float = 1e-6) -> int:
    """Code units that are not constant over the samples (dead ReLU units are constant)."""
    return int((np.ptp(codes, axis=0) > tol).sum()) if len(codes) else 0


def evaluate_features(
    x_train: np.ndarray,
    x_test: np.ndarray,
    codes_train: np.ndarray,
    codes_test: np.ndarray,
    recon_test: np.ndarray,
    y_train: np.ndarray | None,
    y_test: np.ndarray | None,
    probe_max_iter: int = 5000,
    seed: int = 0,
) -> dict[str, Any]:
    """Every evaluation metric for one model, flat and JSON-able."""
    code_dim = codes_test.shape[1]
    z_train, z_test, pca_err = pca_baseline(x_train, x_test, code_dim, seed)
    err = reconstruction_errors(x_test, recon_test)
    metrics: dict[str, Any] = {
        "test_mse": err["mse"],
        "test_mae": err["mae"],
        "pca_test_mse": pca_err["mse"],
        "pca_test_mae": pca_err["mae"],
        "code_dim": code_dim,
        "live_code_units": live_units(codes_test),
    }
    if y_train is not None and y_test is not None and len(np.unique(y_train)) > 1:
        metrics["probe_accuracy_sae"] = probe_accuracy(
            codes_train, y_train, codes_test, y_test, probe_max_iter
        )
        metrics["probe_accuracy_pca"] = probe_accuracy(
            z_train, y_train, z_test, y_test, probe_max_iter
        )
        metrics["probe_accuracy_raw"] = probe_accuracy(
            x_train, y_train, x_test, y_test, probe_max_iter
        )
    return metrics


def fit_probe(
    f_train: np.ndarray,
    y_train: np.ndarray,
    f_test: np.ndarray,
    y_test: np.ndarray,
    max_iter: int = 5000,
) -> dict:
    """A logistic-regression probe as plain numbers, standardization folded into the weights.

    ``{"classes", "coef" (classes, features), "intercept" (classes,), "test_accuracy"}``: the
    label of a row of features ``f`` is ``classes[argmax(f @ coef.T + intercept)]``, which is
    how the registered bundle (``sae_model_runtime``) and ``probe_accuracy_on`` apply it.
    """
    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=max_iter))
    probe.fit(f_train, y_train)
    scaler, lr = probe[0], probe[1]
    coef = lr.coef_ / scaler.scale_  # (classes or 1, features), in unscaled units
    intercept = lr.intercept_ - coef @ scaler.mean_
    if coef.shape[0] == 1:  # binary: one row for the positive class; give each class its own
        coef = np.vstack([np.zeros_like(coef[0]), coef[0]])
        intercept = np.array([0.0, intercept[0]])
    classes = lr.classes_.tolist()
    out = {"classes": classes, "coef": coef.tolist(), "intercept": intercept.tolist()}
    out["test_accuracy"] = probe_accuracy_on(out, f_test, y_test)
    return out


def probe_accuracy_on(probe: dict, features: np.ndarray, labels: np.ndarray) -> float:
    """Accuracy of a plain-number probe (``fit_probe``) on rows of features and their labels."""
    if len(labels) == 0:
        return float("nan")
    logits = features @ np.asarray(probe["coef"]).T + np.asarray(probe["intercept"])
    predicted = np.asarray(probe["classes"])[logits.argmax(axis=1)]
    return float(np.mean(predicted == np.asarray(labels)))
