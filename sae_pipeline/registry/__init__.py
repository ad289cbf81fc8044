"""MLflow: runs and metrics, the registered encoder bundle, aliases and the promotion gate."""
