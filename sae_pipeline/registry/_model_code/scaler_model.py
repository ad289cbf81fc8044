"""MLflow models-from-code file of the fitted scaler, pickle-free (JSON arrays, no scikit-learn).

``predict(frame, params={"direction": "transform" | "inverse"})``: the feature columns scaled
(or mapped back to raw units), same names, float64, bit-equal to scikit-learn's transform.
``artifacts["config"]`` is scaler.json: feature columns and the scaler state.
"""

from __future__ import annotations

from typing import Any

import mlflow.pyfunc
from mlflow.models import set_model
from sae_model_runtime import ScalerBundle


class ScalerModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context):
        self.bundle = ScalerBundle.load(context.artifacts["config"])

    def predict(self, context, model_input, params: dict[str, Any] | None = None):
        return self.bundle.predict(model_input, params)


set_model(ScalerModel())
