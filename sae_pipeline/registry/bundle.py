"""The encoder bundle registered in MLflow: the ``Encoder`` as a pyfunc model.

``mlflow.pyfunc.load_model("models:/<name>@champion")`` gives the same codes as the encoder
that was trained.
"""

from __future__ import annotations

import json
from typing import Any

import mlflow.pyfunc
import pandas as pd

from sae_pipeline.data.contract import Contract
from sae_pipeline.engine.encoder import OUTPUTS, Encoder
from sae_pipeline.engine.net import load_net

__all__ = ["OUTPUTS", "Encoder", "EncoderPyfunc"]


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
