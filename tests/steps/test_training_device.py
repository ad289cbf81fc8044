"""The device policy in the training steps: a task that needs CUDA and cannot get it fails
before it writes anything; the device each phase used is tagged on the MLflow run."""

import pytest
import torch

from sae_pipeline import storage
from sae_pipeline.errors import DeviceError
from sae_pipeline.steps import training as steps


def _prepared(store, run_id, **overrides):
    small = {"model.hidden_dims": [8, 4], "training.pretrain.epochs": 1}
    ctx = steps.prepare(run_id, None, {**store, **small, **overrides})
    for step in (steps.ingest, steps.validate, steps.split, steps.fit_scaler):
        step(ctx)
    return ctx


@pytest.mark.slow
def test_each_phase_tags_the_mlflow_run_with_its_device(store):
    from mlflow import MlflowClient

    ctx = _prepared(store, "manual__device_tag", **{"training.finetune.epochs": 1})
    steps.pretrain_layer(ctx, 1)
    steps.pretrain_layer(ctx, 2)
    summary = steps.finetune(ctx)
    tags = MlflowClient(store["registry.tracking_uri"]).get_run(ctx["mlflow_run_id"]).data.tags
    for phase in ("pretrain_layer1", "pretrain_layer2", "finetune"):
        assert tags[f"sae.device.{phase}"] == "cpu", phase
    assert summary["device"] == "cpu"


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_a_phase_that_requires_cuda_fails_before_writing_anything(store, monkeypatch):
    ctx = _prepared(store, "manual__device_cuda", **{"training.device": "cuda"})
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    with pytest.raises(DeviceError, match=r"cannot use CUDA.*CUDA_VISIBLE_DEVICES ''"):
        steps.pretrain_layer(ctx, 1)
    with pytest.raises(DeviceError, match="cannot use CUDA"):
        steps.finetune(ctx)
    for step in ("pretrain", "finetune"):
        assert not storage.exists(storage.join(ctx["run_dir"], step)), step
