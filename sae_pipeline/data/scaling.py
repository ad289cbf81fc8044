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


ROBUST_SAMPLE_ROWS = 200_000


def fit_scaler_stream(kind: str, chunks, sample=None) -> TransformerMixin:
    """A scaler fitted on chunks of the training part without holding them all.

    standard and minmax: ``partial_fit`` chunk by chunk (the same statistics as ``fit`` on all
    rows, up to float rounding). robust: quantiles need every row, so it is fitted on
    ``sample()``, a fixed-size seeded sample of the training part (``ROBUST_SAMPLE_ROWS``
    rows): its median and IQR are estimates, within about 1% of a quantile's spread.
    none: fitted on the first chunk (it only records the number of features).
    """
    scaler = make_scaler(kind)
    if kind == "robust":
        return scaler.fit(np.asarray(sample(), dtype=np.float64))
    for x in chunks:
        x = np.asarray(x, dtype=np.float64)
        if kind == "none":
            return scaler.fit(x)
        scaler.partial_fit(x)
    if not hasattr(scaler, "n_features_in_"):
        raise ValueError("the training part has no rows: nothing to fit the scaler on")
    return scaler


def affine(scaler: TransformerMixin, n_features: int) -> tuple[np.ndarray, np.ndarray]:
    """(mult, add), float32, such that ``x * mult + add`` is ``scaler.transform(x)``.

    Every scaler here is a per-column affine map; applying it in float32 on the fly costs one
    fused pass over a batch instead of a float64 round trip.
    """
    one = np.ones(n_features)
    if isinstance(scaler, MinMaxScaler) and not scaler.clip:
        mult, add = scaler.scale_, scaler.min_
    elif isinstance(scaler, StandardScaler):
        scale = scaler.scale_ if scaler.scale_ is not None else one
        mean = scaler.mean_ if scaler.mean_ is not None else 0.0 * one
        mult, add = 1.0 / scale, -mean / scale
    elif isinstance(scaler, RobustScaler):
        scale = scaler.scale_ if scaler.scale_ is not None else one
        center = scaler.center_ if scaler.center_ is not None else 0.0 * one
        mult, add = 1.0 / scale, -center / scale
    elif isinstance(scaler, FunctionTransformer) and scaler.func is None:
        mult, add = one, 0.0 * one
    else:  # derive it from the scaler itself: transform of 0 and of the unit vectors
        zero = scaler.transform(np.zeros((1, n_features)))[0]
        ones = scaler.transform(np.ones((1, n_features)))[0]
        mult, add = ones - zero, zero
    return np.asarray(mult, np.float32), np.asarray(add, np.float32)
