"""Retraining after a drift check: the training conf the monitor queues, or a run in-process.

The new training data is the champion's training snapshot plus the batch's valid rows, written
once to ``<root>/retraining/<run key>/training_data.parquet``.
"""

from __future__ import annotations

import logging
from typing import Any

from sae_pipeline import storage
from sae_pipeline.data import batches
from sae_pipeline.errors import DataError
from sae_pipeline.registry import champion
from sae_pipeline.registry.champion import ModelRef

log = logging.getLogger(__name__)

__all__ = ["retrain", "training_conf"]


def training_conf(ctx: dict[str, Any], summary: dict[str, Any]) -> dict[str, Any] | None:
    """The training DAG's conf when the check asks for retraining, else None.

    The new training data is the champion's training snapshot plus the batch's valid rows,
    written once to the store; the config is the champion's own (same architecture and
    settings), with only the data source replaced.
    """
    import pandas as pd

    if not summary.get("retrain_triggered"):
        return None
    ref = ModelRef.from_dict(ctx["model"])
    out = storage.join(ctx["artifacts_root"], "retraining", ctx["run_key"], "training_data.parquet")
    if not storage.exists(out):
        contract = champion.validate_manifest(ref)["contract"]
        features = contract["feature_columns"]
        label, id_col = contract.get("label_column"), contract.get("id_column")
        snapshot = champion.training_snapshot(ref)
        names = set()
        for f in ctx["batch"]["files"]:
            with batches.open_parquet(f) as pf:
                names |= set(pf.schema_arrow.names)
        if id_col and id_col not in names:
            raise DataError(
                f"the champion's data has the id column {id_col!r} but batch "
                f"{ctx['batch']['key']} lacks it; cannot retrain on the two together"
            )
        keep = [*features, *(c for c in (label, id_col) if c and c in names)]
        if label and label not in names:
            log.warning("batch lacks the label %r: retraining without it (no probes)", label)
        parts = []
        for rb in batches.iter_chunks(ctx["batch"]["files"], keep, 65_536):
            ok, _ = batches.finite_rows(batches.feature_matrix(rb, features), features)
            parts.append(rb.to_pandas()[ok])
        new = pd.concat(parts, ignore_index=True)
        combined = pd.concat([snapshot[keep], new[keep]], ignore_index=True)
        storage.write_parquet(out, combined)
        log.info(
            "retraining data %s: %d champion row(s) + %d batch row(s)",
            out,
            len(snapshot),
            len(new),
        )
    conf: dict[str, Any] = {
        "data_source": out,
        "artifacts_root": ctx["artifacts_root"],
        "tracking_uri": ctx["tracking_uri"],
        "encoder_model_name": ref.name,
        "scaler_model_name": ctx["scaler_model_name"],
    }
    if summary.get("review"):  # who decided: tagged on the retrained version
        from sae_pipeline.monitoring.review import review_tags

        conf["review"] = review_tags(summary["review"])
    config = champion.config_uri(ref)
    if storage.is_local(config) and storage.exists(config):
        conf["config_path"] = str(storage.local_path(config))
    return conf


def retrain(ctx: dict[str, Any], summary: dict[str, Any], run_id: str) -> dict[str, Any] | None:
    """Run the training steps in this process on what the DAG would queue; None if not due."""
    from sae_pipeline.steps.training import run_training

    conf = training_conf(ctx, summary)
    if conf is None:
        return None
    overrides = {
        "data.source": conf["data_source"],
        "artifacts_root": conf["artifacts_root"],
        "registry.tracking_uri": conf["tracking_uri"],
        "registry.encoder_model_name": conf["encoder_model_name"],
        "registry.scaler_model_name": conf["scaler_model_name"],
    }
    result = run_training(run_id, conf.get("config_path"), overrides)
    return {k: result[k] for k in ("evaluate", "register", "promote")}
