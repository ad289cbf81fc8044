"""Scalers fitted on the training part only, as scikit-learn transformers, and their state.

scikit-learn's own classes do the fitting and scaling. What is stored is not the object but its
learned arrays as plain data (``to_state``: JSON-ready lists, no pickle); ``from_state``
rebuilds the fitted transformer from them, bit for bit. The registered models carry the same
state, and their serving code applies the same formulas without scikit-learn.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from sklearn.base import TransformerMixin
from sklearn.preprocessing import FunctionTransformer, MinMaxScaler, RobustScaler, StandardScaler

from sae_pipeline.errors import DataError

SCALERS = ("standard", "minmax", "robust", "none")
STATE_FORMAT = "sae-scaler/1"


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


def scaler_kind(scaler: TransformerMixin) -> str:
    kinds = {
        StandardScaler: "standard",
        MinMaxScaler: "minmax",
        RobustScaler: "robust",
        FunctionTransformer: "none",
    }
    kind = kinds.get(type(scaler))
    if kind is None:
        raise DataError(f"cannot store a scaler of type {type(scaler).__name__}")
    return kind


def _floats(a: Any) -> list[float] | None:
    return None if a is None else np.asarray(a, dtype=np.float64).tolist()


def to_state(scaler: TransformerMixin) -> dict[str, Any]:
    """The fitted scaler as plain data: ``kind``, ``n_features`` and its learned arrays.

    The arrays the transform uses have the same names for every kind: ``minmax`` maps
    ``x * scale + min``; ``standard`` and ``robust`` map ``(x - center) / scale`` (either may be
    null when centring or scaling is off); ``none`` is the identity. JSON keeps float64 exactly.
    """
    kind = scaler_kind(scaler)
    state: dict[str, Any] = {
        "format": STATE_FORMAT,
        "kind": kind,
        "n_features": int(scaler.n_features_in_),
    }
    if kind == "minmax":
        state |= {
            "scale": _floats(scaler.scale_),
            "min": _floats(scaler.min_),
            "data_min": _floats(scaler.data_min_),
            "data_max": _floats(scaler.data_max_),
            "feature_range": list(scaler.feature_range),
            "clip": bool(scaler.clip),
        }
    elif kind == "standard":
        state |= {
            "center": _floats(scaler.mean_),
            "scale": _floats(scaler.scale_),
            "var": _floats(scaler.var_),
        }
    elif kind == "robust":
        state |= {"center": _floats(scaler.center_), "scale": _floats(scaler.scale_)}
    return state


def from_state(state: dict[str, Any]) -> TransformerMixin:
    """The fitted scikit-learn scaler ``to_state`` described (transforms bit-equal)."""
    kind = state.get("kind") if isinstance(state, dict) else None
    if kind not in SCALERS:
        raise DataError(f"not a scaler state: kind {kind!r} is not one of {', '.join(SCALERS)}")
    n = int(state["n_features"])

    def arr(key: str) -> np.ndarray | None:
        v = state.get(key)
        if v is None:
            return None
        a = np.asarray(v, dtype=np.float64)
        if a.shape != (n,):
            raise DataError(f"scaler state: {key} has shape {a.shape}, expected ({n},)")
        return a

    if kind == "none":
        return make_scaler("none").fit(np.zeros((1, n)))
    scaler = make_scaler(kind)
    if kind == "minmax":
        scaler.set_params(feature_range=tuple(state["feature_range"]), clip=state["clip"])
        scaler.scale_, scaler.min_ = arr("scale"), arr("min")
        scaler.data_min_, scaler.data_max_ = arr("data_min"), arr("data_max")
        scaler.data_range_ = scaler.data_max_ - scaler.data_min_
    elif kind == "standard":
        center, scale = arr("center"), arr("scale")
        scaler.set_params(with_mean=center is not None, with_std=scale is not None)
        scaler.mean_, scaler.scale_, scaler.var_ = center, scale, arr("var")
    else:
        center, scale = arr("center"), arr("scale")
        scaler.set_params(with_centering=center is not None, with_scaling=scale is not None)
        scaler.center_, scaler.scale_ = center, scale
    scaler.n_features_in_ = n
    scaler.n_samples_seen_ = 0  # unknown after a round trip; transforms do not read it
    return scaler


ROBUST_SAMPLE_ROWS = 200_000


def fit_scaler_stream(kind: str, chunks, sample=None) -> TransformerMixin:
    """A scaler fitted on chunks of the training part (float64) without holding them all.

    standard: means and variances combined chunk by chunk (``_Moments``: each chunk's own,
    merged by Chan's rule), which keeps the precision of ``fit`` on all rows for data far from
    zero (a timestamp of 1.7e9 with a spread of 1), where ``partial_fit``'s running sums lose
    it. minmax: ``partial_fit`` (exact). robust: quantiles need every row, so it is fitted on
    ``sample()``, a fixed-size seeded sample of the training part (``ROBUST_SAMPLE_ROWS``
    rows): its median and IQR are estimates, within about 1% of a quantile's spread.
    none: fitted on the first chunk (it only records the number of features).
    """
    scaler = make_scaler(kind)
    if kind == "robust":
        return scaler.fit(np.asarray(sample(), dtype=np.float64))
    moments = _Moments()
    for x in chunks:
        x = np.asarray(x, dtype=np.float64)
        if kind == "none":
            return scaler.fit(x)
        if kind == "standard":
            moments.add(x)
        else:
            scaler.partial_fit(x)
    if kind == "standard" and moments.n:
        return moments.scaler()
    if not hasattr(scaler, "n_features_in_"):
        raise ValueError("the training part has no rows: nothing to fit the scaler on")
    return scaler


class _Moments:
    """Row count, mean and sum of squared deviations per column, merged chunk by chunk."""

    def __init__(self) -> None:
        self.n, self.mean, self.m2 = 0, None, None

    def add(self, x: np.ndarray) -> None:
        if not len(x):
            return
        mean = x.mean(axis=0)
        m2 = ((x - mean) ** 2).sum(axis=0)
        if self.n == 0:
            self.n, self.mean, self.m2 = len(x), mean, m2
            return
        n = self.n + len(x)
        delta = mean - self.mean
        self.mean = self.mean + delta * (len(x) / n)
        self.m2 = self.m2 + m2 + delta**2 * (self.n * len(x) / n)
        self.n = n

    def scaler(self) -> StandardScaler:
        """A fitted StandardScaler of these moments (constant columns scaled by 1, as
        scikit-learn decides them)."""
        var = self.m2 / self.n
        eps = np.finfo(np.float64).eps
        constant = var <= self.n * eps * var + (self.n * self.mean * eps) ** 2
        scale = np.sqrt(var)
        scale[constant] = 1.0
        scaler = StandardScaler()
        scaler.mean_, scaler.var_, scaler.scale_ = self.mean, var, scale
        scaler.n_samples_seen_, scaler.n_features_in_ = self.n, len(self.mean)
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
