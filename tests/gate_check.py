"""The promotion gate's comparison recomputed beside it, to check what it recorded.

The gate (``registry/gate.py``) leaves out of the challenger's test rows those the champion
fitted or early-stopped on, found by content hashes streamed past the champion's snapshot,
then measures both models in the challenger's scaled space. Here the same rows are found
another way (a set of the champion's training and validation rows, as bytes, read from its
run's stored parts), both models are measured on what is left, and the result must equal
what the gate recorded: its basis tag and the ``gate_*`` metrics of the challenger's run.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from sae_pipeline import storage


def run_context(artifacts_root: str, run_id: str) -> dict[str, Any]:
    """The stored part of a training run's context (its folder and resolved config)."""
    run_dir = storage.run_dir(artifacts_root, storage.run_key(run_id))
    return {"run_dir": run_dir, "config_uri": storage.join(run_dir, "config.json")}


def seen_rows(ctx: dict[str, Any]) -> set[bytes]:
    """The rows (float32 bytes) of a run's training and validation parts."""
    from sae_pipeline.steps import _training_stream as ts
    from sae_pipeline.steps.training import _dataset

    if ts.streamed(ctx):
        parts = [c for p in ("train", "val") for c in ts.part_chunks(ctx, p)]
    else:
        data = _dataset(ctx)
        parts = [data["x_train"], data["x_val"]]
    return {row.tobytes() for x in parts for row in np.asarray(x, dtype=np.float32)}


def expected_gate(challenger_ctx: dict[str, Any], champion_ctx: dict[str, Any]) -> dict[str, Any]:
    """What the gate should have measured for ``challenger_ctx`` against ``champion_ctx``."""
    from sae_pipeline.registry import gate
    from sae_pipeline.steps._run import config_of
    from sae_pipeline.steps.training import _dataset, load_encoder

    data = _dataset(challenger_ctx)
    seen = seen_rows(champion_ctx)
    drop = np.array([r.tobytes() in seen for r in np.asarray(data["x_test"], dtype=np.float32)])
    kept = {**data, "x_test": data["x_test"][~drop]}
    if data.get("y_test") is not None:
        kept["y_test"] = data["y_test"][~drop]
    ours, theirs = load_encoder(challenger_ctx), load_encoder(champion_ctx)
    max_iter = config_of(challenger_ctx).evaluation.probe_max_iter
    return {
        "rows": len(kept["x_test"]),
        "left_out": int(drop.sum()),
        "challenger": gate.measure(ours, kept, ours.scaler, max_iter),
        "champion": gate.measure(theirs, kept, ours.scaler, max_iter),
    }


def assert_gate_measured(client, name: str, version: str, challenger_ctx, champion_ctx) -> None:
    """The gate's record of ``name`` ``version`` matches ``expected_gate``; some rows were
    left out and some were measured, so the check had something to tell apart."""
    expected = expected_gate(challenger_ctx, champion_ctx)
    assert expected["left_out"] > 0 and expected["rows"] > 0, expected
    tags = client.get_model_version(name, version).tags
    assert tags["sae.gate.basis"] == (
        f"both measured on {expected['rows']} of the challenger's test rows "
        f"({expected['left_out']} left out: the champion trained on them)"
    )
    run_id = client.get_model_version(name, version).run_id
    metrics = client.get_run(run_id).data.metrics
    for side in ("challenger", "champion"):
        for key, value in expected[side].items():
            assert metrics[f"gate_{side}_{key}"] == pytest.approx(value, rel=1e-6), (side, key)
