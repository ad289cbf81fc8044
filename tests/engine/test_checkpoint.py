"""Phase checkpoints resume on any device: written on CUDA, resumed on the CPU, and states
that cannot carry over (another device type, ``meta``) reseeded deterministically."""

import logging
import shutil

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

from sae_pipeline.config import ModelConfig, PhaseConfig
from sae_pipeline.engine import _checkpoint, trainer
from sae_pipeline.engine.estimator import StackedAutoencoder
from sae_pipeline.engine.net import Architecture, build_net

PHILOX = torch.arange(16, dtype=torch.uint8)  # what a CUDA generator's get_state() gives


@pytest.fixture(scope="module")
def x():
    return torch.from_numpy((load_digits().data[:400] / 16.0).astype(np.float32))


def as_cuda_written(path, monkeypatch):
    """Rewrite a CPU checkpoint into what a CUDA worker writes: every storage tagged
    ``cuda:0``, the phase generator's state a Philox state, the CUDA generator's state kept."""
    state = torch.load(path, weights_only=True)
    state.update(device="cuda", gen=PHILOX.clone(), cuda_rng=PHILOX.clone())
    if state.get("gen_epoch") is not None:
        state["gen_epoch"] = PHILOX.clone()
    with monkeypatch.context() as m:
        m.setattr(torch.serialization, "location_tag", lambda storage: "cuda:0")
        torch.save(state, path)
    if not torch.cuda.is_available():  # the fixture really is tagged for CUDA
        with pytest.raises(RuntimeError, match="CUDA"):
            torch.load(path, weights_only=True)


def _finetune(x, ckpt, stop_at=None, epochs=6, every_steps=None):
    net = build_net(Architecture(64, [16, 4], output_activation="sigmoid"), seed=1)

    def on_epoch(epoch, *_):
        if epoch == stop_at:
            raise KeyboardInterrupt

    hist = trainer.finetune(net, x, None, PhaseConfig(epochs=epochs, batch_size=32),
                            ModelConfig(dropout=0.1), 3, checkpoint=ckpt, checkpoint_every=2,
                            checkpoint_every_steps=every_steps, on_epoch=on_epoch)  # fmt: skip
    return net, hist


def _killed(x, ckpt, **kw):
    with pytest.raises(KeyboardInterrupt):
        _finetune(x, ckpt, stop_at=3, **kw)  # checkpoint at epochs 1-2 (and steps of epoch 3)


@pytest.mark.parametrize("every_steps", [None, 5], ids=["epoch-end", "mid-epoch"])
def test_a_cuda_written_checkpoint_resumes_on_cpu(x, tmp_path, monkeypatch, caplog, every_steps):
    ckpt = tmp_path / "ft.ckpt"
    _killed(x, ckpt, every_steps=every_steps)
    as_cuda_written(ckpt, monkeypatch)
    copy = tmp_path / "copy.ckpt"
    shutil.copy(ckpt, copy)
    with caplog.at_level(logging.WARNING, logger="sae_pipeline.engine._checkpoint"):
        net, hist = _finetune(x, ckpt, every_steps=every_steps)
    assert len(hist.val_loss) == 6 and np.isfinite(hist.val_loss).all()
    assert "written on cuda resumed on cpu" in caplog.text and "reseeded" in caplog.text
    net2, hist2 = _finetune(x, copy, every_steps=every_steps)  # reseeding is deterministic
    assert hist2.val_loss == hist.val_loss
    for a, b in zip(net.state_dict().values(), net2.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_generator_states_on_another_device_type_are_reseeded(x, tmp_path, caplog):
    """``map_location=<device>`` put the RNG states on the device; ``meta`` stands in for
    CUDA on a CPU machine (no data to copy back)."""
    ckpt = tmp_path / "ft.ckpt"
    _killed(x, ckpt)
    state = torch.load(ckpt, weights_only=True)
    for key in ("gen", "torch_rng"):
        state[key] = state[key].to("meta")
    torch.save(state, ckpt)
    with caplog.at_level(logging.WARNING, logger="sae_pipeline.engine._checkpoint"):
        _, hist = _finetune(x, ckpt)
    assert len(hist.val_loss) == 6 and np.isfinite(hist.val_loss).all()
    assert "torch, phase generator" in caplog.text


def test_a_checkpoint_records_its_device_and_keeps_states_on_the_cpu(x, tmp_path):
    ckpt = tmp_path / "ft.ckpt"
    _killed(x, ckpt)
    state = _checkpoint.load(ckpt)
    assert state["device"] == "cpu" and state["cuda_rng"] is None
    for key in ("gen", "torch_rng"):
        assert state[key].device.type == "cpu" and state[key].dtype == torch.uint8


def test_a_same_device_resume_is_exact_and_logs_no_reseed(x, tmp_path, caplog):
    ref_net, ref_hist = _finetune(x, None)
    ckpt = tmp_path / "ft.ckpt"
    _killed(x, ckpt, every_steps=5)
    with caplog.at_level(logging.WARNING, logger="sae_pipeline.engine._checkpoint"):
        net, hist = _finetune(x, ckpt, every_steps=5)
    assert "reseeded" not in caplog.text
    assert hist.val_loss == ref_hist.val_loss
    for a, b in zip(ref_net.state_dict().values(), net.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_older_checkpoints_without_a_device_are_read_by_their_state_size():
    assert _checkpoint.saved_device({"gen": torch.Generator().get_state()}) == "cpu"
    assert _checkpoint.saved_device({"gen": PHILOX}) == "cuda"


def test_the_estimator_resumes_a_cuda_written_layer_checkpoint_on_cpu(x, tmp_path, monkeypatch):
    params = dict(hidden_dims=(16, 4), pretrain_epochs=6, finetune_epochs=2, random_state=5)
    real, calls = trainer.mean_loss, []

    def killed_in_epoch_6(*args, **kwargs):  # layer 1 checkpoints after epoch 5
        calls.append(1)
        if len(calls) == 6:
            raise KeyboardInterrupt("worker killed")
        return real(*args, **kwargs)

    monkeypatch.setattr(trainer, "mean_loss", killed_in_epoch_6)
    with pytest.raises(KeyboardInterrupt):
        StackedAutoencoder(**params, checkpoint_dir=str(tmp_path)).fit(x.numpy())
    monkeypatch.setattr(trainer, "mean_loss", real)
    as_cuda_written(tmp_path / "layer_1.ckpt", monkeypatch)
    sae = StackedAutoencoder(**params, checkpoint_dir=str(tmp_path)).fit(x.numpy())
    layer1 = sae.pretrain_history_[0]
    assert len(layer1["val_loss"]) == 6 and np.isfinite(layer1["val_loss"]).all()
    assert np.isfinite(sae.transform(x.numpy())).all()
