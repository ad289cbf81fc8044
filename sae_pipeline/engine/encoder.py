"""The encoder: a trained network with its scaler and data contract; raw features in, codes out.

``Encoder`` is what the registry's bundle wraps, batch encoding streams through and the drift
monitor encodes its reference with.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from sae_pipeline.data.contract import Contract
from sae_pipeline.data.scaling import apply_scaler
from sae_pipeline.engine.net import StackedAutoencoderNet
from sae_pipeline.engine.trainer import encode_array, reconstruct_array
from sae_pipeline.errors import DataError

OUTPUTS = ("codes", "reconstruction_error", "all", "anomaly")
ERROR_COLUMN = "reconstruction_error"
SCORE_COLUMN, FLAG_COLUMN = "anomaly_score", "is_anomaly"


@dataclass
class Encoder:
    """A trained encoder with its scaler and data contract."""

    contract: Contract
    scaler: Any
    net: StackedAutoencoderNet
    # ``SAEAnomalyDetector.to_state()`` (metadata, arrays) when the run fitted a detector.
    anomaly: tuple[dict[str, Any], dict[str, np.ndarray]] | None = field(default=None)
    # Copies of ``net`` on other devices, made on first use: ``net`` itself never moves, as
    # callers cache the encoder and share it (the registry's loader, the drift monitor).
    _on_device: dict[str, StackedAutoencoderNet] = field(
        default_factory=dict, repr=False, compare=False
    )

    def net_on(self, device) -> StackedAutoencoderNet:
        """The network on ``device`` (``net`` itself where it already is there), in eval mode."""
        import copy

        import torch

        device = torch.device(device)
        if next(self.net.parameters()).device == device:
            return self.net
        key = str(device)
        if key not in self._on_device:
            self._on_device[key] = copy.deepcopy(self.net).to(device).eval()
        return self._on_device[key]

    @property
    def code_columns(self) -> list[str]:
        return [f"code_{i}" for i in range(self.net.arch.hidden_dims[-1])]

    def features(self, frame: pd.DataFrame) -> np.ndarray:
        """The contract's feature columns of ``frame``, in contract order, as float64."""
        missing = [c for c in self.contract.feature_columns if c not in frame.columns]
        if missing:
            raise DataError(f"input lacks feature column(s) of the contract: {', '.join(missing)}")
        return frame[self.contract.feature_columns].to_numpy(dtype=np.float64)

    def anomaly_columns(self, raw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(anomaly_score (rows,), is_anomaly (rows,)) of raw feature rows: the detector's
        outlyingness (higher = stranger) and whether it passes the fitted threshold."""
        from sae_pipeline.engine._anomaly_ops import state_outlyingness

        if self.anomaly is None:
            raise ValueError("this encoder has no anomaly detector (anomaly.enabled was off)")
        meta, arrays = self.anomaly
        score = state_outlyingness(meta, arrays, raw)
        return score, score > meta["threshold"]

    def transform(self, frame: pd.DataFrame, output: str = "codes") -> pd.DataFrame:
        """Codes, per-row reconstruction error and/or anomaly columns for raw features."""
        if output not in OUTPUTS or (output == "anomaly" and self.anomaly is None):
            raise ValueError(f"output must be one of {OUTPUTS}, got {output!r}")
        raw = self.features(frame)
        x = apply_scaler(self.scaler, raw)
        result = pd.DataFrame(index=frame.index)
        if output in ("codes", "all"):
            codes = encode_array(self.net, x)
            result = pd.DataFrame(codes, columns=self.code_columns, index=frame.index)
        if output in ("reconstruction_error", "all"):
            recon = reconstruct_array(self.net, x)
            result["reconstruction_error"] = np.mean((recon - x) ** 2, axis=1)
        if output in ("all", "anomaly") and self.anomaly is not None:
            result[SCORE_COLUMN], result[FLAG_COLUMN] = self.anomaly_columns(raw)
        return result


def encode_rows(encoder, x: np.ndarray, device=None) -> tuple[np.ndarray, np.ndarray]:
    """Codes (rows, code) and per-row reconstruction MSE (rows,) for raw features ``x``.

    One forward pass gives both; the numbers are those of ``Encoder.transform`` (same scaler,
    same float32 network, eval mode).
    """
    import torch

    xs = torch.from_numpy(apply_scaler(encoder.scaler, x))  # (rows, features) float32
    net = encoder.net if device is None else encoder.net_on(device)
    with torch.inference_mode():
        xs = xs.to(next(net.parameters()).device)
        recon, code = net(xs)  # (rows, features), (rows, code)
        err = (recon.float() - xs).square_().mean(dim=1)
    return code.float().cpu().numpy(), err.cpu().numpy()
