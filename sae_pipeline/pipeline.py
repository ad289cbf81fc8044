"""The training path run in one process, step by step, without Airflow (CLI ``train``)."""

from __future__ import annotations

from typing import Any

from sae_pipeline import steps


def run_training(
    run_id: str, config_path: str | None = None, overrides: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Every training step in DAG order; returns what each step returned."""
    ctx = steps.prepare(run_id, config_path, overrides)
    cfg = steps.config_of(ctx)
    result: dict[str, Any] = {"context": ctx}
    result["ingest"] = steps.ingest(ctx)
    result["validate"] = steps.validate(ctx)
    result["split"] = steps.split(ctx)
    result["fit_scaler"] = steps.fit_scaler(ctx)
    result["pretrain"] = [steps.pretrain_layer(ctx, k) for k in range(1, cfg.n_layers + 1)]
    result["finetune"] = steps.finetune(ctx)
    result["evaluate"] = steps.evaluate(ctx)
    result["register"] = steps.register(ctx)
    result["promote"] = steps.promote(ctx, result["register"])
    return result
