"""MLflow models-from-code file of the fitted scaler, pickle-free (JSON arrays, no scikit-learn).

``predict(frame, params={"direction": "transform" | "inverse"})``: the feature columns scaled
(or mapped back to raw units), same names, float64, bit-equal to scikit-learn's transform.
``artifacts["config"]`` is scaler.json: feature columns and the scaler state.
"""

from __future__ import annotations

from typing import Any

import mlflow.pyfunc
import pandas as pd
from mlflow.models import set_model
from sae_model_runtime import ScalerBundle


class ScalerModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context):
        self.bundle = ScalerBundle.load(context.artifacts["config"])

    # The hint (a frame, from which MLflow infers no schema) only silences MLflow's "Add type
    # hints" warning at every load: the signature is logged explicitly (bundle._signature).
    def predict(
        self, context, model_input: pd.DataFrame, params: dict[str, Any] | None = None
    ) -> pd.DataFrame:
        return self.bundle.predict(model_input, params)


set_model(ScalerModel())
