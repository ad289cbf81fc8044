"""Code that travels inside the registered models (MLflow models-from-code and ``code_paths``).

Nothing here imports ``sae_pipeline``: these files are copied into each model and run in
environments that have only the model's own requirements (mlflow, torch, numpy, pandas).
``sae_model_runtime`` is the reader of the bundle files; ``encoder_model`` and ``scaler_model``
are the pyfunc definitions MLflow executes at load time.
"""
