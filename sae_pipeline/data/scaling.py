"""Scalers fitted on the training part only, as scikit-learn transformers.

scikit-learn's own classes are used so that the registered scaler is a plain sklearn model:
users load it with ``mlflow.sklearn.load_model`` and get ``transform``/``inverse_transform``.
"""

from __future__ import annotations

import numpy as np
from sklearn.base import TransformerMixin
from sklearn.preprocessing import FunctionTransformer, MinMaxScaler, RobustScaler, StandardScaler

SCALERS = ("standard", "minmax", "robust", "none")


def make_scaler(kind: str) -> TransformerMixin:
    """A new, unfitted scaler of the given kind (constant columns map to 0, not NaN)."""
    if kind == "standard":
        return StandardScaler()
    if kind == "minmax":
        return MinMaxScaler()
    if kind == "robust":
        return RobustScaler()
    if kind == "none":
        return FunctionTransformer(None, validate=True)
    raise ValueError(f"unknown scaler kind {kind!r}; choose from {', '.join(SCALERS)}")


def fit_scaler(kind: str, x_train: np.ndarray) -> TransformerMixin:
    return make_scaler(kind).fit(np.asarray(x_train, dtype=np.float64))


def apply_scaler(scaler: TransformerMixin, x: np.ndarray) -> np.ndarray:
    """Scale to float32, the dtype the network trains in."""
    return np.asarray(scaler.transform(np.asarray(x, dtype=np.float64)), dtype=np.float32)
