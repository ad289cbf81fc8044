"""Re-register a legacy (cloudpickled) encoder version in the pickle-free bundle format.

Versions registered before the bundle format hold ``python_model.pkl`` (a cloudpickled pyfunc
whose class no longer exists) and ``artifacts/{net.pt, contract.json, scaler.joblib}``. The
pipeline does not load them (``bundle.load_encoder`` refuses them with this command's name);
``migrate_version`` reads their three artifacts once: the network with
``torch.load(weights_only=True)``, the contract as JSON and the fitted scikit-learn scaler with
``joblib.load``, the one unpickling left in the project, of a file the registry's owner
trusts, run by hand. It then logs the same encoder as a new version (same lineage tags, plus
``sae.migrated_from``), does the same for the scaler version of the same run, and moves the
old versions' aliases to the new ones.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from sae_pipeline.config import PipelineConfig
from sae_pipeline.errors import RegistryError

MIGRATED_TAG = "sae.migrated_from"
LEGACY_FILES = ("net.pt", "contract.json", "scaler.joblib")


def read_legacy_encoder(model_dir: Path):
    """The ``Encoder`` of a legacy model folder (see the module docstring for what is read)."""
    import joblib

    from sae_pipeline.data.contract import Contract
    from sae_pipeline.engine.encoder import Encoder
    from sae_pipeline.engine.net import load_net

    art = model_dir / "artifacts"
    missing = [f for f in LEGACY_FILES if not (art / f).is_file()]
    if missing:
        raise RegistryError(f"{model_dir}: not a legacy encoder (lacks {', '.join(missing)})")
    contract = Contract.from_dict(json.loads((art / "contract.json").read_text()))
    scaler = joblib.load(art / "scaler.joblib")  # trusted legacy file, read once by hand
    return Encoder(contract, scaler, load_net(str(art / "net.pt")))


def migrate_version(cfg: PipelineConfig, version: str) -> dict[str, Any]:
    """Re-register encoder ``version`` (and its run's scaler); returns the new versions."""
    import mlflow
    import mlflow.artifacts

    from sae_pipeline.registry import bundle, tracking

    c = tracking.client(cfg)
    name, scaler_name = cfg.registry.encoder_model_name, cfg.registry.scaler_model_name
    try:
        old = c.get_model_version(name, str(version))
    except mlflow.exceptions.MlflowException:
        raise RegistryError(f"model {name!r} has no version {version}") from None
    for v in c.search_model_versions(f"name = '{name}'"):
        if v.tags.get(MIGRATED_TAG) == str(version):  # done before: nothing to do twice
            return {"encoder": str(v.version), "migrated_from": str(version), "new": False}
    uri = f"models:/{name}/{version}"
    with tempfile.TemporaryDirectory() as tmp:
        local = bundle.download(uri, tracking.tracking_uri(cfg), tmp)
        if (local / "artifacts" / "encoder.json").is_file():
            raise RegistryError(f"{uri} is already in the bundle format")
        encoder = read_legacy_encoder(local)
    columns = encoder.contract.feature_columns
    example = pd.DataFrame(np.zeros((5, len(columns))), columns=columns)
    tags = {**old.tags, MIGRATED_TAG: str(version)}
    key = old.tags.get(tracking.RUN_KEY_TAG)
    old_scaler = tracking.find_version(c, scaler_name, key) if key else None
    if old_scaler is not None:  # searches leave aliases out
        old_scaler = c.get_model_version(scaler_name, old_scaler.version)
    scaler_tags = {**tags, MIGRATED_TAG: str(old_scaler.version) if old_scaler else ""}
    with mlflow.start_run(run_id=old.run_id):
        new = bundle.log_encoder_model(encoder, example, name, tags)
        new_scaler = bundle.log_scaler_model(encoder, example, scaler_name, scaler_tags)
    result = {
        "encoder": str(new.registered_model_version),
        "scaler": str(new_scaler.registered_model_version),
        "migrated_from": str(version),
        "new": True,
    }
    moves = [
        (name, old, result["encoder"], tags),
        (scaler_name, old_scaler, result["scaler"], scaler_tags),
    ]
    for model, was, now, model_tags in moves:
        for k, v in model_tags.items():
            c.set_model_version_tag(model, now, k, v)
        for alias in getattr(was, "aliases", None) or []:
            c.set_registered_model_alias(model, alias, now)
    result["aliases"] = sorted(old.aliases)
    return result
