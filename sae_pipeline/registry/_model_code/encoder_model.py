"""MLflow models-from-code file of the encoder bundle (logged as ``python_model=<this file>``).

MLflow copies this file into the model and executes it at load time; ``set_model`` hands MLflow
the instance. ``sae_model_runtime`` comes along through ``code_paths``. Loading reads
``artifacts["config"]`` (encoder.json) and ``artifacts["weights"]`` (weights.npz, read with
``allow_pickle=False``) and, with a fitted detector, ``artifacts["anomaly"]`` (anomaly.npz, the
same): no pickle anywhere.

Request params: ``output`` = ``codes`` (default) | ``reconstruction_error`` | ``all`` (and
``anomaly`` when the bundle has an anomaly section).
"""

from __future__ import annotations

from typing import Any

import mlflow.pyfunc
import pandas as pd
from mlflow.models import set_model
from sae_model_runtime import EncoderBundle


class EncoderModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context):
        a = context.artifacts
        self.bundle = EncoderBundle.load(a["config"], a["weights"], a.get("anomaly"))

    # The hint (a frame, from which MLflow infers no schema) only silences MLflow's "Add type
    # hints" warning at every load: the signature is logged explicitly (bundle._signature).
    def predict(
        self, context, model_input: pd.DataFrame, params: dict[str, Any] | None = None
    ) -> pd.DataFrame:
        return self.bundle.predict(model_input, params)


set_model(EncoderModel())
