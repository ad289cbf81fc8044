"""The encoder: a trained network with its scaler and data contract; raw features in, codes out.

``Encoder`` is what the registry's bundle wraps, batch encoding streams through and the drift
monitor encodes its reference with.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from sae_pipeline.data.contract import Contract
from sae_pipeline.data.scaling import apply_scaler
from sae_pipeline.engine.net import StackedAutoencoderNet
from sae_pipeline.engine.trainer import encode_array, reconstruct_array
from sae_pipeline.errors import DataError

OUTPUTS = ("codes", "reconstruction_error", "all")
ERROR_COLUMN = "reconstruction_error"


@dataclass
class Encoder:
    """A trained encoder with its scaler and data contract."""

    contract: Contract
    scaler: Any
    net: StackedAutoencoderNet

    @property
    def code_columns(self) -> list[str]:
        return [f"code_{i}" for i in range(self.net.arch.hidden_dims[-1])]

    def features(self, frame: pd.DataFrame) -> np.ndarray:
        """The contract's feature columns of ``frame``, in contract order, as float64."""
        missing = [c for c in self.contract.feature_columns if c not in frame.columns]
        if missing:
            raise DataError(f"input lacks feature column(s) of the contract: {', '.join(missing)}")
        return frame[self.contract.feature_columns].to_numpy(dtype=np.float64)

    def transform(self, frame: pd.DataFrame, output: str = "codes") -> pd.DataFrame:
        """Codes (and/or per-row reconstruction error) for a frame of raw features."""
        if output not in OUTPUTS:
            raise ValueError(f"output must be one of {OUTPUTS}, got {output!r}")
        x = apply_scaler(self.scaler, self.features(frame))
        result = pd.DataFrame(index=frame.index)
        if output in ("codes", "all"):
            codes = encode_array(self.net, x)
            result = pd.DataFrame(codes, columns=self.code_columns, index=frame.index)
        if output in ("reconstruction_error", "all"):
            recon = reconstruct_array(self.net, x)
            result["reconstruction_error"] = np.mean((recon - x) ** 2, axis=1)
        return result


def encode_rows(encoder, x: np.ndarray, device=None) -> tuple[np.ndarray, np.ndarray]:
    """Codes (rows, code) and per-row reconstruction MSE (rows,) for raw features ``x``.

    One forward pass gives both; the numbers are those of ``Encoder.transform`` (same scaler,
    same float32 network, eval mode).
    """
    import torch

    xs = torch.from_numpy(apply_scaler(encoder.scaler, x))  # (rows, features) float32
    net = encoder.net
    if device is not None and next(net.parameters()).device != device:
        net.to(device)
    with torch.inference_mode():
        xs = xs.to(next(net.parameters()).device)
        recon, code = net(xs)  # (rows, features), (rows, code)
        err = (recon.float() - xs).square_().mean(dim=1)
    return code.float().cpu().numpy(), err.cpu().numpy()
