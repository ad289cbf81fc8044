"""The run a training step belongs to: its context, its config and where its outputs go.

Every step takes ``ctx`` (the small dict ``prepare`` returns: run key, config URI, MLflow run
id), reads its inputs from the run's folder in the artifact store, writes its outputs there
atomically, and returns a small JSON-able dict. A step whose output already exists returns it
instead of redoing the work, so retries and re-runs neither duplicate nor change results.
"""

from __future__ import annotations

import logging
import subprocess
from pathlib import Path
from typing import Any

from sae_pipeline import storage
from sae_pipeline.config import PipelineConfig, build_config, load_config

log = logging.getLogger(__name__)


def code_version() -> str:
    """Package version plus the git commit when running from a checkout."""
    from sae_pipeline import __version__

    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"],
            cwd=Path(__file__).parent,
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        sha = ""
    return f"{__version__}+{sha}" if sha else __version__


def config_of(ctx: dict[str, Any]) -> PipelineConfig:
    return build_config(storage.read_json(ctx["config_uri"]))


def _uri(ctx: dict[str, Any], *parts: str) -> str:
    return storage.join(ctx["run_dir"], *parts)


# ---- prepare ----------------------------------------------------------------------------------
def prepare(
    run_id: str,
    config_path: str | None = None,
    overrides: dict[str, Any] | None = None,
    expected_layers: int | None = None,
    resume: bool | None = None,
) -> dict[str, Any]:
    """Validate the config once, store it with the run, and open (or find) the MLflow run.

    ``resume``: None for a DAG task (its run id is new, or this is a retry of it); False for a
    new run, refused when ``run_id`` has one already; True to continue run ``run_id``, refused
    when there is none or when its stored config differs (the message names each field).
    """
    from sae_pipeline.registry import tracking
    from sae_pipeline.steps.deployment import (
        check_config_path,
        check_no_inline_password,
        check_run_locations,
    )

    # Every location is checked and normalised before any use (MLflow sends credentials to
    # the tracking URI; the config is written under the root); only checked values go on.
    config_path = check_config_path(config_path)
    cfg = check_run_locations(load_config(config_path, **(overrides or {})))
    check_no_inline_password(cfg)
    if expected_layers is not None and cfg.n_layers != expected_layers:
        from sae_pipeline.errors import ConfigError

        raise ConfigError(
            f"invalid config: model.hidden_dims has {cfg.n_layers} layer(s) but this DAG was "
            f"built for {expected_layers}; set SAE_CONFIG to a config with that many layers"
        )
    # Resolve the store and the tracking URI now, so every task on every worker uses the same.
    cfg = cfg.model_copy(
        update={
            "registry": cfg.registry.model_copy(
                update={"tracking_uri": tracking.tracking_uri(cfg)}
            ),
        }
    )
    key = storage.run_key(run_id)
    run_dir = storage.run_dir(cfg.artifacts_root, key)
    config_uri = storage.join(run_dir, "config.json")
    if resume is not None:
        _check_resume(run_id, cfg, config_uri, resume)
    storage.write_json(config_uri, cfg.model_dump(mode="json"))
    mlflow_run_id = tracking.find_or_create_run(
        cfg,
        key,
        tags={
            "sae.dag_run_id": run_id,
            "sae.config_hash": cfg.config_hash(),
            "sae.code_version": code_version(),
        },
    )
    log.info("run %s: MLflow run %s, artifacts %s", key, mlflow_run_id, run_dir)
    return {
        "run_key": key,
        "run_id": run_id,
        "run_dir": run_dir,
        "config_uri": config_uri,
        "mlflow_run_id": mlflow_run_id,
        "tracking_uri": cfg.registry.tracking_uri,
    }


def _check_resume(run_id: str, cfg: PipelineConfig, config_uri: str, resume: bool) -> None:
    """Refuse a new run whose id is taken, or a resume of a run that is missing or whose stored
    config differs from ``cfg``: its finished steps would be returned as results of ``cfg``."""
    from sae_pipeline.errors import ConfigError

    exists = storage.exists(config_uri)
    if not resume and exists:
        raise ConfigError(f"run {run_id!r} exists; --resume {run_id} continues it")
    if resume and not exists:
        raise ConfigError(f"no run {run_id!r} to resume under {cfg.artifacts_root}")
    if resume:
        stored = build_config(storage.read_json(config_uri)).flat_params()
        given = cfg.flat_params()
        diff = [
            f"{k}: {stored.get(k, '(unset)')} -> {given.get(k, '(unset)')}"
            for k in sorted(stored.keys() | given.keys())
            if stored.get(k) != given.get(k)
        ]
        if diff:
            raise ConfigError(
                f"cannot resume run {run_id!r}: its config differs ({'; '.join(diff)}); "
                "start a new run instead"
            )
