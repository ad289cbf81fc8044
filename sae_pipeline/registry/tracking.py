"""MLflow adapter: the run of a training DAG run, metrics, model registration and aliases.

Everything that talks to MLflow lives here; steps call these functions. Each call that creates
something first looks for what an earlier try of the same task created (by the run key tag),
so a retried task never makes a second run or a second model version.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import mlflow
from mlflow import MlflowClient
from mlflow.entities import Metric

from sae_pipeline import storage
from sae_pipeline.config import PipelineConfig, mask_credentials
from sae_pipeline.errors import RegistryError

RUN_KEY_TAG = "sae.run_key"
CHAMPION, CHALLENGER = "champion", "challenger"


def tracking_uri(cfg: PipelineConfig) -> str:
    """The configured URI, else $MLFLOW_TRACKING_URI, else SQLite under the artifact root."""
    uri = cfg.registry.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    root = storage.normalize_root(cfg.artifacts_root)
    if not storage.is_local(root):
        raise RegistryError(
            "registry.tracking_uri is unset and artifacts_root is remote; set an MLflow server URI"
        )
    path = Path(root) / "mlflow" / "mlflow.db"
    path.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{path}"


def client(cfg: PipelineConfig) -> MlflowClient:
    uri = tracking_uri(cfg)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def experiment_id(c: MlflowClient, cfg: PipelineConfig) -> str:
    """The experiment's id, creating it (with artifacts beside a local store) if needed."""
    exp = c.get_experiment_by_name(cfg.registry.experiment)
    if exp is not None:
        return exp.experiment_id
    location = None
    uri = c.tracking_uri
    if uri.startswith("sqlite:///"):
        location = (Path(uri.removeprefix("sqlite:///")).parent / "artifacts").as_uri()
    try:
        return c.create_experiment(cfg.registry.experiment, artifact_location=location)
    except mlflow.exceptions.MlflowException:
        # Another task created it between our lookup and create.
        return c.get_experiment_by_name(cfg.registry.experiment).experiment_id


def find_or_create_run(cfg: PipelineConfig, key: str, tags: dict[str, str]) -> str:
    """The MLflow run of this pipeline run: found by its run key tag, or created."""
    c = client(cfg)
    exp = experiment_id(c, cfg)
    found = c.search_runs([exp], filter_string=f"tags.`{RUN_KEY_TAG}` = '{key}'", max_results=1)
    if found:
        return found[0].info.run_id
    run = c.create_run(exp, run_name=key, tags={RUN_KEY_TAG: key, **tags})
    c.log_batch(run.info.run_id, params=[_param(k, v) for k, v in cfg.flat_params().items()])
    return run.info.run_id


def child_run(
    cfg: PipelineConfig,
    parent_id: str,
    name: str,
    params: dict[str, Any],
    metrics: dict[str, float] | None = None,
) -> str:
    """A nested run under the pipeline run (one per selection candidate), found or created,
    with its metrics logged and then ended (FINISHED): nothing more is logged to it."""
    c = client(cfg)
    parent = c.get_run(parent_id)
    key = f"{parent.data.tags.get(RUN_KEY_TAG, parent_id)}/{name}"
    found = c.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.`{RUN_KEY_TAG}` = '{key}'", max_results=1
    )
    if found:
        run_id = found[0].info.run_id
    else:
        run = c.create_run(
            parent.info.experiment_id,
            run_name=name,
            tags={RUN_KEY_TAG: key, "mlflow.parentRunId": parent_id},
        )
        run_id = run.info.run_id
        c.log_batch(run_id, params=[_param(k, str(v)) for k, v in params.items()])
    if metrics:
        log_metrics(cfg, run_id, metrics)
    c.set_terminated(run_id, "FINISHED")
    return run_id


def mark_failed(cfg: PipelineConfig, run_id: str, reason: str) -> None:
    """End a run as FAILED (a task of its DAG run failed for good), saying why in a tag."""
    c = client(cfg)
    c.set_tag(run_id, "sae.failure", mask_credentials(reason)[:5000])
    c.set_terminated(run_id, "FAILED")


def _param(key: str, value: str):
    from mlflow.entities import Param

    return Param(key, value[:6000])


def log_metrics(cfg: PipelineConfig, run_id: str, metrics: dict[str, float], step: int = 0) -> None:
    """One batched call for many metrics (each log_metric call is a round trip)."""
    ts = int(time.time() * 1000)
    items = [
        Metric(k, float(v), ts, step)
        for k, v in metrics.items()
        if isinstance(v, int | float) and not isinstance(v, bool)
    ]
    c = client(cfg)
    for i in range(0, len(items), 1000):
        c.log_batch(run_id, metrics=items[i : i + 1000])


def log_history(cfg: PipelineConfig, run_id: str, prefix: str, history: dict[str, Any]) -> None:
    """Per-epoch losses of a phase as ``<prefix>_train_loss``/``<prefix>_val_loss`` by step."""
    ts = int(time.time() * 1000)
    items = [
        Metric(f"{prefix}_{name}", float(v), ts, epoch)
        for name in ("train_loss", "val_loss")
        for epoch, v in enumerate(history[name])
    ]
    c = client(cfg)
    for i in range(0, len(items), 1000):
        c.log_batch(run_id, metrics=items[i : i + 1000])


def set_run_tags(cfg: PipelineConfig, run_id: str, tags: dict[str, str]) -> None:
    c = client(cfg)
    for k, v in tags.items():
        c.set_tag(run_id, k, v)


def log_artifact_file(cfg: PipelineConfig, run_id: str, path: str, artifact_path: str) -> None:
    client(cfg).log_artifact(run_id, path, artifact_path)


# ---- registry ---------------------------------------------------------------------------------
def find_version(c: MlflowClient, name: str, key: str):
    """The version of ``name`` an earlier try of this run registered, if any.

    A failed search raises: taken for "none", it would make a retry register the run again.
    """
    for v in c.search_model_versions(f"name = '{name}'"):
        if v.tags.get(RUN_KEY_TAG) == key:
            return v
    return None


def register_encoder(
    cfg: PipelineConfig,
    run_id: str,
    key: str,
    encoder,
    example,
    lineage: dict[str, str],
    **sections,
) -> dict[str, str]:
    """Log and register the encoder bundle and the scaler (both pickle-free) as ``challenger``.

    ``sections``: plain-data parts of the bundle's ``encoder.json`` (``probe``, ``anomaly``).

    Both versions carry the run key and the lineage tags from their creation (one MLflow call
    creates the version with its tags), so a retry after a failure at any point finds what an
    earlier try registered instead of registering a second version.
    """
    from sae_pipeline.registry import bundle

    c = client(cfg)
    names = {"encoder": cfg.registry.encoder_model_name, "scaler": cfg.registry.scaler_model_name}
    existing = {role: find_version(c, name, key) for role, name in names.items()}
    tags = {RUN_KEY_TAG: key, **lineage}
    versions: dict[str, str] = {}
    with mlflow.start_run(run_id=run_id):
        if existing["encoder"] is None:
            info = bundle.log_encoder_model(encoder, example, names["encoder"], tags, **sections)
            versions["encoder"] = str(info.registered_model_version)
        else:
            versions["encoder"] = str(existing["encoder"].version)
        if existing["scaler"] is None:
            info = bundle.log_scaler_model(encoder, example, names["scaler"], tags)
            versions["scaler"] = str(info.registered_model_version)
        else:
            versions["scaler"] = str(existing["scaler"].version)
    for role, name in names.items():
        c.set_registered_model_alias(name, CHALLENGER, versions[role])
    return versions


def alias_version(c: MlflowClient, name: str, alias: str):
    try:
        return c.get_model_version_by_alias(name, alias)
    except mlflow.exceptions.MlflowException:
        return None


def set_alias(cfg: PipelineConfig, name: str, alias: str, version: str) -> None:
    client(cfg).set_registered_model_alias(name, alias, version)
