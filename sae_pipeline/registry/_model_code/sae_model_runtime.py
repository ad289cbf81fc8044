"""Reader of the registered encoder and scaler bundles: validation, scaling, the network forward.

Travels inside each registered model (``code_paths``) and imports only json, numpy, pandas,
torch and (lazily, for its error type) mlflow; never ``sae_pipeline``, scikit-learn, Airflow or
Evidently, so a model loads wherever its own ``requirements.txt`` is installed.

An encoder bundle is ``weights.npz`` (the network's ``state_dict`` as plain arrays, read with
``allow_pickle=False``), ``encoder.json`` (``format``, ``arch``, ``contract``, ``scaler``,
``default_output`` and the optional ``anomaly`` and ``probe`` sections; readers ignore keys they
do not know, a change of meaning bumps ``format``) and, with a detector section, ``anomaly.npz``
(its arrays). docs/service.md describes each section and the outputs it adds.

The forward pass mirrors ``sae_pipeline.engine.net.StackedAutoencoderNet`` in eval mode (dropout
off, batch norm on running statistics) with the same state_dict keys; the scaler applies
scikit-learn's formulas in float64, so both match the trained encoder.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

FORMAT = "sae-encoder-bundle/1"
SCALER_FORMAT = "sae-scaler-bundle/1"
BASE_OUTPUTS = ("codes", "reconstruction_error", "all")
ERROR_COLUMN = "reconstruction_error"
SCALER_KINDS = ("minmax", "standard", "robust", "none")
NEEDS_DECODE = ("reconstruction_error", "all", "anomaly")
_BN_EPS = 1e-5  # nn.BatchNorm1d's default, as net.py builds it

_ACTIVATIONS = {
    "relu": F.relu,
    "leaky_relu": lambda x: F.leaky_relu(x, 0.01),
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
    "linear": lambda x: x,
}


# ---- errors: HTTP 400 with a plain message ------------------------------------------------------
_INPUT_ERROR: type | None = None


def bad_request(message: str) -> Exception:
    """An error MLflow's scoring server answers with HTTP 400 and exactly ``message``: it
    rewrites the message of any other MlflowException raised in predict to one that holds the
    repr of the whole input; this subclass keeps its first message, so nothing is echoed."""
    global _INPUT_ERROR
    if _INPUT_ERROR is None:
        from mlflow.exceptions import MlflowException
        from mlflow.protos.databricks_pb2 import BAD_REQUEST

        class InputError(MlflowException, ValueError):
            @property
            def message(self) -> str:
                return self._message

            @message.setter
            def message(self, value: str) -> None:
                if not hasattr(self, "_message"):
                    self._message = value

        InputError.error_code_value = BAD_REQUEST
        _INPUT_ERROR = InputError
    return _INPUT_ERROR(message, error_code=_INPUT_ERROR.error_code_value)


def as_frame(data: Any, columns: list[str]) -> pd.DataFrame:
    """``data`` as a frame with named columns: a frame as is; an array, a list of rows or a
    frame whose columns have no names (0, 1, ...) of the right width gets ``columns``."""
    if isinstance(data, pd.DataFrame) and not _unnamed(data.columns):
        return data
    if not isinstance(data, pd.DataFrame):
        try:
            data = pd.DataFrame(np.asarray(data) if isinstance(data, list) else data)
        except Exception:
            raise bad_request(
                f"input must be a table of feature columns, got {type(data).__name__}"
            ) from None
        if not _unnamed(data.columns):  # a dict or records: named
            return data
    if data.shape[1] != len(columns):
        raise bad_request(
            f"input has {data.shape[1]} unnamed column(s); expected {len(columns)} feature "
            f"columns: {_names(columns)}"
        )
    return data.set_axis(columns, axis=1)


def _unnamed(cols: pd.Index) -> bool:
    return len(cols) > 0 and all(isinstance(c, (int, np.integer)) for c in cols)


def feature_matrix(frame: Any, columns: list[str]) -> np.ndarray:
    """The feature columns of ``frame`` (``as_frame``'s) in order, as a finite float64 array."""
    if frame.shape[0] == 0:
        raise bad_request("input has no rows")
    same = list(frame.columns) == columns  # the usual case: no column lookups
    missing = [] if same else [c for c in columns if c not in frame.columns]
    if missing:
        raise bad_request(f"input lacks {len(missing)} feature column(s): {_names(missing)}")
    sub = frame if same else frame[columns]
    plain = all(isinstance(t, np.dtype) and t.kind in "iuf" for t in sub.dtypes)  # fast check
    odd = [] if plain else [c for c in columns if not _plain_number(sub[c].dtype)]
    if odd:  # strings (CSV/JSON cells that are not numbers), booleans, objects
        bad = []
        for col in odd:
            s = sub[col]
            wrong = s.notna() if pd.api.types.is_bool_dtype(s) else _not_numbers(s)
            if wrong.any():
                row = s.index[wrong.to_numpy()][0]
                bad.append(f"{col} (row {row}: {_short(s.loc[row])})")
        if bad:
            raise bad_request(f"non-numeric value(s) in feature column(s): {', '.join(bad[:10])}")
        sub = sub.apply(pd.to_numeric)
    x = sub.to_numpy(dtype=np.float64)
    check_finite(x, columns, sub.index, "missing or infinite value(s)")
    return x


def check_finite(x: np.ndarray, columns: list[str], index: Any, what: str) -> None:
    """A 400 naming the columns (and the first row) of ``x`` that are NaN or infinite."""
    finite = np.isfinite(x)
    if not finite.all():
        rows, cols = np.nonzero(~finite)
        raise bad_request(
            f"{what} in feature column(s): {_names(sorted({columns[c] for c in cols}))} "
            f"(first at row {index[rows[0]]})"
        )


def _plain_number(dtype: Any) -> bool:
    return pd.api.types.is_numeric_dtype(dtype) and not pd.api.types.is_bool_dtype(dtype)


def _not_numbers(s: pd.Series) -> pd.Series:
    return pd.to_numeric(s, errors="coerce").isna() & s.notna()


def _names(cols: list[str], limit: int = 10) -> str:
    more = f" and {len(cols) - limit} more" if len(cols) > limit else ""
    return ", ".join(map(str, cols[:limit])) + more


def _choice(params: Any, key: str, allowed: tuple[str, ...], default: str) -> str:
    """``params[key]``, one of ``allowed``; a non-string value is named by its type only."""
    value = (params or {}).get(key) or default
    if not isinstance(value, str):
        raise bad_request(f"params.{key} must be a string, got {type(value).__name__}")
    if value not in allowed:
        raise bad_request(f"params.{key} must be one of {', '.join(allowed)}; got {_short(value)}")
    return value


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


class Scaler:
    """scikit-learn's transform formulas on float64, from a ``to_state`` dict."""

    def __init__(self, state: dict[str, Any]):
        self.kind = state.get("kind")
        if self.kind not in SCALER_KINDS:
            raise ValueError(f"unknown scaler kind {self.kind!r}")
        self.n_features = int(state["n_features"])

        def arr(key: str) -> np.ndarray | None:
            v = state.get(key)
            a = None if v is None else np.asarray(v, dtype=np.float64)
            if a is not None and a.shape != (self.n_features,):
                raise ValueError(f"scaler {key} has shape {a.shape}, not ({self.n_features},)")
            return a

        self.scale, self.min, self.center = arr("scale"), arr("min"), arr("center")
        self.clip = tuple(state["feature_range"]) if state.get("clip") else None

    def transform(self, x: np.ndarray) -> np.ndarray:
        x = np.array(x, dtype=np.float64, copy=True)
        if self.kind == "minmax":  # MinMaxScaler: X *= scale_; X += min_
            x *= self.scale
            x += self.min
            if self.clip is not None:
                np.clip(x, self.clip[0], self.clip[1], out=x)
        elif self.kind in ("standard", "robust"):  # (X - center) / scale
            if self.center is not None:
                x -= self.center
            if self.scale is not None:
                x /= self.scale
        return x

    def inverse_transform(self, x: np.ndarray) -> np.ndarray:
        x = np.array(x, dtype=np.float64, copy=True)
        if self.kind == "minmax":
            x -= self.min
            x /= self.scale
        elif self.kind in ("standard", "robust"):
            if self.scale is not None:
                x *= self.scale
            if self.center is not None:
                x += self.center
        return x


def load_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """The state_dict arrays of ``weights.npz`` as tensors (``allow_pickle=False``)."""
    with np.load(path, allow_pickle=False) as z:
        return {k: torch.from_numpy(np.array(z[k])) for k in z.files}


class Net:
    """Eval-mode forward of StackedAutoencoderNet from its state_dict."""

    def __init__(self, arch: dict[str, Any], state: dict[str, torch.Tensor]):
        self.arch = arch
        self.dims = [int(arch["input_dim"]), *map(int, arch["hidden_dims"])]
        self.n = len(self.dims) - 1
        self.s = state
        for k in range(self.n):  # fail at load, not at the first request
            w = state.get(f"encoders.{k}.weight")
            if w is None or tuple(w.shape) != (self.dims[k + 1], self.dims[k]):
                shape = None if w is None else tuple(w.shape)
                raise ValueError(f"weights: encoders.{k}.weight has shape {shape}")
        for name in (arch["activation"], arch["code_activation"], arch["output_activation"]):
            if name not in _ACTIVATIONS:
                raise ValueError(f"unknown activation {name!r}")

    def encode_layer(self, k: int, x: torch.Tensor) -> torch.Tensor:
        """(batch, dims[k]) -> (batch, dims[k+1])."""
        s = self.s
        h = F.linear(x, s[f"encoders.{k}.weight"], s[f"encoders.{k}.bias"])
        if self.arch.get("batch_norm"):
            h = F.batch_norm(
                h,
                s[f"norms.{k}.running_mean"],
                s[f"norms.{k}.running_var"],
                s[f"norms.{k}.weight"],
                s[f"norms.{k}.bias"],
                False,
                0.0,
                _BN_EPS,
            )
        last = k == self.n - 1
        return _ACTIVATIONS[self.arch["code_activation"] if last else self.arch["activation"]](h)

    def decode_layer(self, k: int, h: torch.Tensor) -> torch.Tensor:
        """(batch, dims[k+1]) -> (batch, dims[k])."""
        s = self.s
        if self.arch.get("tied_weights"):
            z = F.linear(h, s[f"encoders.{k}.weight"].t(), s[f"decoder_biases.{k}"])
        else:
            z = F.linear(h, s[f"decoders.{k}.weight"], s[f"decoders.{k}.bias"])
        name = self.arch["output_activation"] if k == 0 else self.arch["activation"]
        return _ACTIVATIONS[name](z)

    @torch.inference_mode()
    def forward(self, x: np.ndarray, decode: bool = True, batch: int = 8192):
        """Codes (rows, code) and, with ``decode``, reconstructions (rows, input); float32."""
        codes, recons = [], []
        for i in range(0, len(x), batch):
            h = torch.from_numpy(np.ascontiguousarray(x[i : i + batch], dtype=np.float32))
            for k in range(self.n):
                h = self.encode_layer(k, h)
            codes.append(h)
            if decode:
                r = h
                for k in reversed(range(self.n)):
                    r = self.decode_layer(k, r)
                recons.append(r)
        code = torch.cat(codes).numpy() if codes else np.zeros((0, self.dims[-1]), np.float32)
        if not decode:
            return code, None
        recon = torch.cat(recons).numpy() if recons else np.zeros((0, self.dims[0]), np.float32)
        return code, recon


# ---- the anomaly detector (a copy of sae_pipeline.engine._anomaly_ops.state_outlyingness) -------
DETECTOR_KINDS = ("sae-ensemble/1", "sae-ensemble/2")  # /2 adds isolation trees


def _kth_distance(q: np.ndarray, p: np.ndarray, k: int, chunk: int = 4096) -> np.ndarray:
    """Euclidean distance from each row of ``q`` to its k-th nearest row of ``p``."""
    p2 = np.sum(p**2, axis=1)
    out = np.empty(len(q))
    for i in range(0, len(q), chunk):
        d2 = np.sum(q[i : i + chunk] ** 2, axis=1)[:, None] + p2 - 2.0 * q[i : i + chunk] @ p.T
        out[i : i + chunk] = np.sqrt(np.partition(np.maximum(d2, 0.0), k - 1, axis=1)[:, k - 1])
    return out


def _isolation_depth(feature: np.ndarray, threshold: np.ndarray, value: np.ndarray, x):
    """Mean path length of each row over heap-ordered isolation trees (children 2i+1, 2i+2)."""
    rows, total = np.arange(len(x)), np.zeros(len(x))
    for f, thr, val in zip(feature, threshold, value, strict=True):
        node = np.zeros(len(x), dtype=np.int64)
        for _ in range(int(np.log2(feature.shape[1] + 1)) - 1):
            feat = f[node]
            right = x[rows, np.maximum(feat, 0)] >= thr[node]
            node = np.where(feat >= 0, 2 * node + 1 + right, node)
        total += val[node]
    return total / len(feature)


def detector_outlyingness(meta: dict, arrays: dict[str, np.ndarray], x: np.ndarray) -> np.ndarray:
    """Outlyingness of raw rows (higher = stranger): each member's normalised error, code kNN
    distance and (kind /2) isolation depth, in robust z units, weighted and averaged."""
    xs = (np.asarray(x, dtype=np.float64) - arrays["center"]) / arrays["scale"]  # (rows, d)
    norms, n = arrays["norms"], int(meta["n_members"])
    iso_w, knn_w = float(meta.get("isolation_weight", 0.0)), float(meta["knn_weight"])
    weights = ((1.0 - iso_w) * (1.0 - knn_w), (1.0 - iso_w) * knn_w, iso_w)
    total = np.zeros(len(xs))
    for i in range(n):
        w1, b1, w2, b2, v2, c2, v1, c1 = (arrays[f"m{i}.w{j}"] for j in range(8))
        code = np.maximum(xs @ w1.T + b1, 0.0) @ w2.T + b2  # (rows, code)
        recon = np.maximum(code @ v2.T + c2, 0.0) @ v1.T + c1  # (rows, d)
        err = np.log1p(np.mean((recon - xs) ** 2 / arrays[f"m{i}.feature_error"], axis=1))
        ref = arrays[f"m{i}.codes"]
        views = [err, np.log1p(_kth_distance(code, ref, min(int(meta["n_neighbors"]), len(ref))))]
        if iso_w > 0:
            trees = (arrays[f"m{i}.tree_{a}"] for a in ("feature", "threshold", "value"))
            views.append(-_isolation_depth(*trees, xs))
        for j, v in enumerate(views):
            total += weights[j] * (v - norms[i, j, 0]) / norms[i, j, 1]
    return (total / n - meta["score_center"]) / meta["score_scale"]


def load_arrays(path: str | Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as z:
        return {k: np.array(z[k]) for k in z.files}


# ---- the bundles --------------------------------------------------------------------------------
def read_json(path: str | Path) -> dict[str, Any]:
    return json.loads(Path(path).read_text(encoding="utf-8"))


class EncoderBundle:
    """Raw feature frame in; codes, reconstruction error (and optional sections) out."""

    def __init__(self, config: dict, weights: dict[str, torch.Tensor], detector=None):
        if config.get("format") != FORMAT:
            raise ValueError(f"not an encoder bundle of format {FORMAT}: {config.get('format')!r}")
        self.config = config
        self.feature_columns = [str(c) for c in config["contract"]["feature_columns"]]
        self.scaler = Scaler(config["scaler"])
        self.net = Net(config["arch"], weights)
        if not len(self.feature_columns) == self.scaler.n_features == self.net.dims[0]:
            raise ValueError("feature columns, scaler and network input sizes disagree")
        self.anomaly = config.get("anomaly")
        self.detector = detector
        if self.anomaly and self.anomaly.get("kind") in DETECTOR_KINDS and detector is None:
            raise ValueError("the anomaly section needs the detector's arrays (anomaly.npz)")
        self.probe = config.get("probe")
        if self.probe is not None:
            self._probe_coef = np.asarray(self.probe["coef"], dtype=np.float64)
            self._probe_intercept = np.asarray(self.probe["intercept"], dtype=np.float64)
            if self._probe_coef.shape != (len(self.probe["classes"]), self.net.dims[-1]):
                raise ValueError(f"probe coef has shape {self._probe_coef.shape}")
        optional = (("anomaly", self.anomaly), ("probe", self.probe))
        self.outputs = (*BASE_OUTPUTS, *(name for name, section in optional if section))
        self.default_output = config.get("default_output", "codes")

    @classmethod
    def load(cls, config_path, weights_path, anomaly_path=None) -> EncoderBundle:
        """From the paths of encoder.json, weights.npz and (with a detector) anomaly.npz."""
        detector = load_arrays(anomaly_path) if anomaly_path else None
        return cls(read_json(config_path), load_weights(weights_path), detector)

    @property
    def code_columns(self) -> list[str]:
        return [f"code_{i}" for i in range(self.net.dims[-1])]

    def output_option(self, params: dict[str, Any] | None) -> str:
        return _choice(params, "output", self.outputs, self.default_output)

    def predict(self, frame: Any, params: dict[str, Any] | None = None) -> pd.DataFrame:
        """What the pyfunc's predict returns: validates the request, then ``transform``."""
        return self.transform(frame, self.output_option(params))

    def transform(self, frame: Any, output: str = "codes") -> pd.DataFrame:
        x, xs, index = self.prepare(frame)
        codes, recon = self.net.forward(xs, decode=output in NEEDS_DECODE)
        return self.finish(x, xs, codes, recon, output, index)

    def prepare(self, frame: Any) -> tuple[np.ndarray, np.ndarray, Any]:
        """Checked raw rows (float64), the network's input (float32, scaled) and the index.

        Finiteness is checked again after scaling and the cast to float32: a finite 1e39
        overflows there, and would come out as Infinity/NaN codes."""
        frame = as_frame(frame, self.feature_columns)
        x = feature_matrix(frame, self.feature_columns)
        with np.errstate(over="ignore", invalid="ignore"):
            xs = self.scaler.transform(x).astype(np.float32)  # (rows, features)
        check_finite(xs, self.feature_columns, frame.index, "value(s) out of range after scaling")
        return x, xs, frame.index

    def finish(self, x, xs, codes, recon, output: str, index: Any = None) -> pd.DataFrame:
        """The output frame of rows ``x`` (raw) / ``xs`` (scaled) from their forward pass."""
        parts: dict[str, Any] = {}
        if output in ("codes", "all"):
            parts.update(zip(self.code_columns, codes.T, strict=True))
        if output in NEEDS_DECODE:
            err = np.mean((recon - xs) ** 2, axis=1)  # (rows,) float32, as Encoder.transform
            if output != "anomaly":
                parts[ERROR_COLUMN] = err
            if self.anomaly and output in ("all", "anomaly"):
                a = self.anomaly
                if a.get("kind") in DETECTOR_KINDS:  # the detector reads the raw rows
                    score = detector_outlyingness(a, self.detector, x)
                else:
                    score = (err.astype(np.float64) - a.get("center", 0.0)) / a.get("scale", 1.0)
                parts["anomaly_score"] = score
                parts["is_anomaly"] = score > a["threshold"]
        if self.probe and output in ("all", "probe"):
            logits = codes.astype(np.float64) @ self._probe_coef.T + self._probe_intercept
            parts["probe_label"] = np.asarray(self.probe["classes"])[logits.argmax(axis=1)]
        return pd.DataFrame(parts, index=index)


class ScalerBundle:
    """The fitted scaler alone: feature frame in, scaled (or unscaled) feature frame out."""

    DIRECTIONS = ("transform", "inverse")

    def __init__(self, config: dict[str, Any]):
        if config.get("format") != SCALER_FORMAT:
            raise ValueError(f"not a scaler bundle of format {SCALER_FORMAT}")
        self.feature_columns = [str(c) for c in config["feature_columns"]]
        self.scaler = Scaler(config["scaler"])

    @classmethod
    def load(cls, config_path: str | Path) -> ScalerBundle:
        return cls(read_json(config_path))

    def predict(self, frame: Any, params: dict[str, Any] | None = None) -> pd.DataFrame:
        direction = _choice(params, "direction", self.DIRECTIONS, "transform")
        frame = as_frame(frame, self.feature_columns)
        x = feature_matrix(frame, self.feature_columns)
        fn = self.scaler.transform if direction == "transform" else self.scaler.inverse_transform
        with np.errstate(over="ignore", invalid="ignore"):
            out = fn(x)
        check_finite(out, self.feature_columns, frame.index, "value(s) out of range after scaling")
        return pd.DataFrame(out, columns=self.feature_columns, index=frame.index)
