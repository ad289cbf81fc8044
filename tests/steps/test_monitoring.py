"""The drift monitor's memory, and the gate after drift retraining, with a real tiny champion.

A champion is trained in this process (the training steps, tiny settings) on Gaussian blobs;
a shifted batch then drifts.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from tests.conftest import TINY

pytestmark = [pytest.mark.integration, pytest.mark.slow]
FEATURES = [f"f{i}" for i in range(6)]


def blobs(n: int, seed: int, shift: float = 0.0) -> pd.DataFrame:
    centres = np.random.default_rng(42).normal(0.0, 3.0, size=(3, len(FEATURES)))
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    frame = pd.DataFrame(centres[y] + rng.normal(size=(n, len(FEATURES))) + shift, columns=FEATURES)
    frame["target"] = y
    return frame


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from sae_pipeline.steps.training import run_training

    tmp = tmp_path_factory.mktemp("drift")
    blobs(300, 0).to_parquet(tmp / "train.parquet", index=False)
    (blobs(120, 1) * 1.5 + 3.0).assign(target=1).to_parquet(tmp / "shifted.parquet", index=False)
    store = {
        "artifacts_root": str(tmp / "artifacts"),
        "registry.tracking_uri": f"sqlite:///{tmp / 'mlflow.db'}",
    }
    trained = run_training(
        "manual__champion", None, {**TINY, **store, "data.source": str(tmp / "train.parquet")}
    )
    assert trained["promote"]["promoted"]
    params = {
        "artifacts_root": store["artifacts_root"],
        "tracking_uri": store["registry.tracking_uri"],
    }
    return {"tmp": tmp, "params": params}


def _daily_run(world, run_id: str):
    """What the drift DAG does for one run: check, then the retraining conf (None: skipped)."""
    from sae_pipeline.steps import monitoring

    params = {**world["params"], "batch": str(world["tmp"] / "shifted.parquet"), "sample_rows": 0}
    ctx = monitoring.context(run_id, params)
    summary = monitoring.run_check(ctx)
    return ctx, summary, monitoring.training_conf(ctx, summary)


def test_the_same_batch_and_champion_are_judged_once(world):
    ctx, first, conf = _daily_run(world, "scheduled__day1")
    assert first["drift_detected"] and first["retrain_triggered"] and conf is not None
    # The next day: same latest batch, same champion (the retraining not run yet).
    _, second, again = _daily_run(world, "scheduled__day2")
    assert again is None and second["retrain_triggered"] is False
    assert second["already_decided_by"] == "scheduled__day1"
    assert second["decision"] == first["decision"]
    # A retry of the first run still gives its own decision (and its conf: the trigger is
    # keyed by the run, so it queues nothing twice).
    _, retried, conf_again = _daily_run(world, "scheduled__day1")
    assert retried["retrain_triggered"] and conf_again == conf
    world["retraining"] = (ctx, first)


def test_after_drift_retraining_the_gate_leaves_out_rows_the_champion_trained_on(world):
    from sae_pipeline.steps import monitoring

    if "retraining" not in world:
        pytest.skip("needs the drift check above")
    ctx, summary = world["retraining"]
    result = monitoring.retrain(ctx, summary, "drift__scheduled__day1")
    from mlflow import MlflowClient

    c = MlflowClient(world["params"]["tracking_uri"])
    version = c.get_model_version("sae-digits-encoder", result["register"]["encoder_version"])
    basis = version.tags["sae.gate.basis"]
    assert "left out: the champion trained on them" in basis, basis
