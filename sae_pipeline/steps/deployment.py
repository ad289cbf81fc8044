"""What this deployment allows a run to do, read from the environment the operator sets.

A DAG run's params come from whoever may trigger it; the workers hold the MLflow credentials
and the artifact store. So the MLflow server, artifact root and config file a run names are
checked against allow-lists before any MLflow call (``check_run_locations``,
``check_config_path``); credentials in URLs are masked wherever a URL is recorded
(``mask_credentials``); and every task has a time limit (``task_timeout``).
See docs/deployment-security.md.
"""

from __future__ import annotations

import os
from datetime import timedelta
from pathlib import Path

from sae_pipeline.config import PipelineConfig, mask_credentials
from sae_pipeline.errors import ConfigError

# ---- what a run may point at ---------------------------------------------------------------
CREDENTIAL_ENV = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN")


def _env_list(name: str) -> list[str]:
    return [v.strip() for v in os.environ.get(name, "").split(",") if v.strip()]


def _under(path: str, roots: list[str]) -> bool:
    p = Path(path.removeprefix("file://")).resolve()
    return any(p == (r := Path(root).resolve()) or r in p.parents for root in roots)


def check_config_path(config_path: str | os.PathLike | None) -> None:
    """Refuse a config file outside ``$SAE_ALLOWED_CONFIG_DIRS`` (when that is set)."""
    allowed = _env_list("SAE_ALLOWED_CONFIG_DIRS")
    path = str(config_path or "").strip()
    if allowed and path and not _under(path, allowed):
        raise ConfigError(
            f"config_path {path!r} is outside the allowed config folders "
            f"({', '.join(allowed)}; SAE_ALLOWED_CONFIG_DIRS)"
        )


def check_run_locations(cfg: PipelineConfig) -> None:
    """Refuse a run whose MLflow server or artifact store is not this deployment's.

    Run params may set ``tracking_uri`` and ``artifacts_root``; MLflow sends the credentials in
    the worker's environment to whatever server a run names. Call before any MLflow call.

    - ``$SAE_ALLOWED_TRACKING_URIS`` (comma-separated): the only tracking URIs a run may name.
      Unset, but MLflow credentials in the environment: only ``$MLFLOW_TRACKING_URI``.
      Neither (the embedded demo): any URI.
    - ``$SAE_ALLOWED_ARTIFACT_ROOTS``: roots the artifact store must be (or lie under).
    """
    uri = cfg.registry.tracking_uri
    allowed = _env_list("SAE_ALLOWED_TRACKING_URIS")
    if not allowed and any(os.environ.get(k) for k in CREDENTIAL_ENV):
        allowed = _env_list("MLFLOW_TRACKING_URI") or ["(none: set MLFLOW_TRACKING_URI)"]
    if uri and allowed and uri.rstrip("/") not in {a.rstrip("/") for a in allowed}:
        raise ConfigError(
            f"tracking_uri {mask_credentials(uri)!r} is not this deployment's MLflow server "
            f"(allowed: {', '.join(mask_credentials(a) for a in allowed)}); the workers' MLflow "
            "credentials go only there"
        )
    roots = _env_list("SAE_ALLOWED_ARTIFACT_ROOTS")
    root = cfg.artifacts_root
    if roots:
        local = "://" not in root or root.startswith("file://")
        ok = (
            _under(root, [r for r in roots if "://" not in r])
            if local
            else any(root.rstrip("/") == r.rstrip("/") or root.startswith(r.rstrip("/") + "/")
                     for r in roots)
        )  # fmt: skip
        if not ok:
            raise ConfigError(
                f"artifacts_root {root!r} is outside the allowed artifact roots "
                f"({', '.join(roots)}; SAE_ALLOWED_ARTIFACT_ROOTS)"
            )


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
    """Refuse a ``data.source`` URL with a password in it: the resolved config is stored with
    the run and the source is shown in logs and lineage; name an environment variable with
    ``data.source_password_env`` instead."""
    source = cfg.data.source
    if mask_credentials(source) != source:
        raise ConfigError(
            f"data.source {mask_credentials(source)!r} holds a password: it would be stored "
            "with the run (config, MLflow, Airflow conf). Write the URL without it and set "
            "data.source_password_env to the environment variable that holds it"
        )
