"""sae-pipeline: production MLOps for stacked autoencoders.

Heavy modules (torch, mlflow) load on first use, so that importing the package, the config or
the steps from a DAG file stays cheap.
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = [
    "PipelineConfig",
    "SAEAnomalyDetector",
    "StackedAutoencoder",
    "__version__",
    "load_config",
]


def __getattr__(name: str):
    if name in ("PipelineConfig", "load_config"):
        from sae_pipeline import config

        return getattr(config, name)
    if name == "StackedAutoencoder":
        from sae_pipeline.engine.estimator import StackedAutoencoder

        return StackedAutoencoder
    if name == "SAEAnomalyDetector":
        from sae_pipeline.engine.anomaly import SAEAnomalyDetector

        return SAEAnomalyDetector
    raise AttributeError(f"module 'sae_pipeline' has no attribute {name!r}")
