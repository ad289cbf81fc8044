"""The context the encoding and monitoring DAGs start from: config, batch and pinned champion."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

from sae_pipeline import boundary, storage
from sae_pipeline.config import load_config
from sae_pipeline.data.batches import NoBatch, inspect_batch, list_files, sources_from_events
from sae_pipeline.registry import champion
from sae_pipeline.steps.deployment import check_config_path, check_run_locations

log = logging.getLogger(__name__)

PARAM_FIELDS = {
    "artifacts_root": "artifacts_root",
    "tracking_uri": "registry.tracking_uri",
    "encoder_model_name": "registry.encoder_model_name",
    "scaler_model_name": "registry.scaler_model_name",
}


def overrides_from_params(params: Mapping[str, Any]) -> dict[str, Any]:
    return {field: params[name] for name, field in PARAM_FIELDS.items() if params.get(name)}


def batch_context(
    run_id: str,
    params: Mapping[str, Any],
    events: Mapping[Any, Sequence[Any]] | None = None,
    latest: Sequence[Any] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Resolve config, batch and champion once for a DAG run (or a CLI call).

    The batch is the ``batch`` param, else the paths in the triggering Asset events, else the
    path of the ``latest`` announced batch (a sequence of events; its last one counts). The
    model is ``model_version`` when given, else the version behind the ``champion`` alias
    *now*; every later task of the run uses that version. ``overrides`` are dotted config
    fields (the CLI's ``--set``).
    """
    config_path = check_config_path(params.get("config_path") or os.environ.get("SAE_CONFIG"))
    cfg = load_config(config_path, **{**(overrides or {}), **overrides_from_params(params)})
    # Before any MLflow call (credentials go to the URI it allows); normalised locations on.
    cfg = check_run_locations(cfg, data=False)
    batch = params.get("batch") or sources_from_events(events)
    if not batch and latest is not None:
        with contextlib.suppress(IndexError, KeyError):
            batch = sources_from_events({"latest": [latest[-1]]})
    if not batch:
        raise NoBatch(
            "no batch to process: set the 'batch' param or announce one with an event on the "
            "new-batches Asset whose extra holds {'path': ...}"
        )
    # Each named source, then each file found in a folder (a symlink out of it), is checked
    # against $SAE_ALLOWED_DATA_SOURCES before it is opened; a wrong path fails here, before
    # any registry lookup.
    sources = [batch] if isinstance(batch, str) else list(batch)
    checked = [boundary.data_location(str(s), "batch") for s in sources]
    files = [boundary.data_location(f, "batch file") for f in list_files(checked)]
    ref = champion.resolve(cfg, version=params.get("model_version"))
    encoder = champion.load_encoder(ref)
    info = inspect_batch(files, encoder.contract)
    log.info(
        "batch %s: %d row(s) in %d file(s); model %s v%s",
        info["key"],
        info["rows"],
        len(info["files"]),
        ref.name,
        ref.version,
    )
    return {
        "run_id": run_id,
        "run_key": storage.run_key(run_id),
        "artifacts_root": cfg.artifacts_root,
        "tracking_uri": ref.tracking_uri,
        "config_path": config_path,
        "scaler_model_name": cfg.registry.scaler_model_name,
        "model": ref.to_dict(),
        "batch": info,
    }
