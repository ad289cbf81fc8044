"""The encoder bundle: raw features in, codes out, with the fitted scaler inside.

``Encoder`` is the in-memory object (contract + scaler + network); ``EncoderPyfunc`` wraps it
as an MLflow pyfunc model so that ``mlflow.pyfunc.load_model("models:/<name>@champion")``
gives the same codes as the encoder that was trained.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import mlflow.pyfunc
import numpy as np
import pandas as pd

from sae_pipeline.data import Contract
from sae_pipeline.errors import DataError
from sae_pipeline.model import StackedAutoencoderNet, load_net
from sae_pipeline.scaling import apply_scaler
from sae_pipeline.trainer import encode_array, reconstruct_array

OUTPUTS = ("codes", "reconstruction_error", "all")


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


class EncoderPyfunc(mlflow.pyfunc.PythonModel):
    """MLflow pyfunc flavour of ``Encoder``; ``params={"output": ...}`` picks what comes out."""

    def load_context(self, context):
        import joblib

        with open(context.artifacts["contract"], encoding="utf-8") as fh:
            contract = Contract.from_dict(json.load(fh))
        self.encoder = Encoder(
            contract, joblib.load(context.artifacts["scaler"]), load_net(context.artifacts["net"])
        )

    def predict(self, context, model_input, params: dict[str, Any] | None = None):
        frame = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input)
        return self.encoder.transform(frame, output=(params or {}).get("output", "codes"))
