"""What this deployment allows a run to do, read from the environment the operator sets.

A DAG run's params come from whoever may trigger it; the workers hold the MLflow credentials
and the artifact store. So the MLflow server, artifact root, data source and config file a run
names are checked against allow-lists (``sae_pipeline.boundary``) before any MLflow call, and
only their normalised values travel on (``check_run_locations``, ``check_config_path``);
credentials in URLs are refused, and masked wherever a URL is recorded (``mask_credentials``);
and every task has a time limit (``task_timeout``).
See docs/deployment-security.md.
"""

from __future__ import annotations

import os
from datetime import timedelta
from pathlib import Path

from sae_pipeline import boundary
from sae_pipeline.config import DataConfig, PipelineConfig, mask_credentials
from sae_pipeline.errors import ConfigError

# ---- what a run may point at ---------------------------------------------------------------
CREDENTIAL_ENV = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN")


def _env_list(name: str) -> list[str]:
    return [v.strip() for v in os.environ.get(name, "").split(",") if v.strip()]


def check_config_path(
    config_path: str | os.PathLike | None, what: str = "config_path"
) -> str | None:
    """The normalised config file path; ConfigError outside ``$SAE_ALLOWED_CONFIG_DIRS``."""
    path = str(config_path or "").strip()
    return boundary.config_location(path, what) if path else None


def check_run_locations(cfg: PipelineConfig, data: bool = True) -> PipelineConfig:
    """``cfg`` with its locations checked and normalised; ConfigError naming a refused one.

    Run params may set ``tracking_uri``, ``artifacts_root`` and ``data.source``; MLflow sends
    the credentials in the worker's environment to whatever server a run names. Call before
    any MLflow call, and use the returned config (its locations are the normalised ones).

    - ``$SAE_ALLOWED_TRACKING_URIS`` (comma-separated): the only tracking URIs a run may name.
      Unset, but MLflow credentials in the environment: only ``$MLFLOW_TRACKING_URI``.
      Neither (the embedded demo): any URI.
    - ``$SAE_ALLOWED_ARTIFACT_ROOTS``: roots the artifact store must be (or lie under).
    - ``$SAE_ALLOWED_DATA_SOURCES`` (with ``data``): where ``data.source`` and
      ``data.contract`` may be read from (``sae_pipeline.boundary``).
    """
    check_tracking_uri(cfg.registry.tracking_uri)
    update: dict = {"artifacts_root": boundary.artifact_location(cfg.artifacts_root)}
    if data:
        update["data"] = check_data_locations(cfg.data)
    return cfg.model_copy(update=update)


def check_data_locations(data: DataConfig) -> DataConfig:
    """``data`` with ``source`` and ``contract`` checked against ``$SAE_ALLOWED_DATA_SOURCES``
    and normalised (the training DAG's ``data_source``, the CLI's ``ingest --source``)."""
    contract = data.contract
    return data.model_copy(
        update={
            "source": boundary.data_location(data.source, "data.source"),
            "contract": contract and boundary.data_location(contract, "data.contract"),
        }
    )


def check_tracking_uri(uri: str | None) -> None:
    """ConfigError when ``uri`` holds a credential or is not a server this deployment allows
    (``check_run_locations``); MLflow sends the worker's credentials wherever it points."""
    if uri and boundary.find_secret(uri):
        raise ConfigError(
            f"tracking_uri {boundary.mask_secrets(uri)!r} holds a credential: it would be "
            "stored with the run; set MLFLOW_TRACKING_USERNAME/PASSWORD or _TOKEN instead"
        )
    allowed = _env_list("SAE_ALLOWED_TRACKING_URIS")
    if not allowed and any(os.environ.get(k) for k in CREDENTIAL_ENV):
        allowed = _env_list("MLFLOW_TRACKING_URI") or ["(none: set MLFLOW_TRACKING_URI)"]
    if uri and allowed and uri.rstrip("/") not in {a.rstrip("/") for a in allowed}:
        raise ConfigError(
            f"tracking_uri {mask_credentials(uri)!r} is not this deployment's MLflow server "
            f"(allowed: {', '.join(mask_credentials(a) for a in allowed)}); the workers' MLflow "
            "credentials go only there"
        )


def check_local_output(raw: str | None, what: str) -> Path | None:
    """A local file or folder a command writes (``serve --live-file``, ``--log-dir``): on this
    machine, and under ``$SAE_ALLOWED_ARTIFACT_ROOTS`` like every place the pipeline writes."""
    if not raw:
        return None
    if boundary.parse_location(raw, what).protocol != boundary.LOCAL:
        raise ConfigError(f"{what} {mask_credentials(raw)!r} must be a local path, not a URL")
    return Path(boundary.artifact_location(raw, what))


def task_timeout(heavy: bool = False) -> timedelta:
    """A DAG task's ``execution_timeout``: ``$SAE_TASK_TIMEOUT_MINUTES`` (default 60), or for
    heavy tasks (training on the heavy queue) ``$SAE_HEAVY_TASK_TIMEOUT_MINUTES`` (default 720).
    A hung call then frees its worker slot (the single GPU slot, for heavy tasks)."""
    name, default = (
        ("SAE_HEAVY_TASK_TIMEOUT_MINUTES", 720) if heavy else ("SAE_TASK_TIMEOUT_MINUTES", 60)
    )
    raw = os.environ.get(name, "").strip()
    try:
        minutes = float(raw) if raw else default
    except ValueError:
        raise ConfigError(f"{name} must be a number of minutes, got {raw!r}") from None
    if minutes <= 0:
        raise ConfigError(f"{name} must be positive, got {raw!r}")
    return timedelta(minutes=minutes)


def check_no_inline_password(cfg: PipelineConfig) -> None:
    """Refuse a ``data.source`` URL with a password in it (userinfo or a query key such as
    ``password``): the resolved config is stored with the run and the source is shown in logs
    and lineage; name an environment variable with ``data.source_password_env`` instead."""
    source = cfg.data.source
    if boundary.find_secret(source):
        raise ConfigError(
            f"data.source {mask_credentials(source)!r} holds a password: it would be stored "
            "with the run (config, MLflow, Airflow conf). Write the URL without it and set "
            "data.source_password_env to the environment variable that holds it"
        )
