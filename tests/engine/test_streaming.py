"""Training streamed from Parquet shards against training in memory, and mid-epoch resume."""

from __future__ import annotations

import threading

import numpy as np
import pandas as pd
import pytest
import torch

from sae_pipeline.config import ModelConfig, PhaseConfig
from sae_pipeline.data import parts, row_cache
from sae_pipeline.engine import trainer
from sae_pipeline.engine.net import Architecture, build_net
from sae_pipeline.engine.streaming import ShardStream

CPU = torch.device("cpu")
COLUMNS = [f"f{i}" for i in range(16)]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """4,096 rows of 16 correlated features in [0, 1], as 4 shards of 4 row groups."""
    rng = np.random.default_rng(0)
    z = rng.normal(size=(4096, 3))
    x = 1 / (1 + np.exp(-(z @ rng.normal(size=(3, 16)))))
    folder = tmp_path_factory.mktemp("shards")
    files = []
    for s in range(4):
        path = folder / f"part-{s}.parquet"
        pd.DataFrame(x[s * 1024 : (s + 1) * 1024], columns=COLUMNS).to_parquet(
            path, row_group_size=256
        )
        files.append(str(path))
    return x.astype(np.float32), parts.units(files)


@pytest.fixture(scope="module")
def cache(data, tmp_path_factory):
    """The same rows as a row cache (what fit_scaler writes), in files of 300 rows."""
    x, _ = data
    return row_cache.write(str(tmp_path_factory.mktemp("cache")), [x], 16, file_rows=300)


def _stream(units, batch=64, seed=0, cache=None):
    ones, zeros = np.ones(16, np.float32), np.zeros(16, np.float32)
    return ShardStream(
        units, COLUMNS, None, "train", 4096, ones, zeros, batch, seed, CPU, 1024,
        slice_rows=100, cache=cache,
    )  # fmt: skip


def _net():
    return build_net(Architecture(16, [12, 4], output_activation="sigmoid"), seed=0)


@pytest.mark.parametrize("source", ["shards", "row cache"])
def test_the_stream_yields_every_row_once_per_epoch_in_a_new_order(data, cache, source):
    x, units = data
    stream = _stream(units, cache=cache if source == "row cache" else None)
    first = torch.cat(list(stream.epoch(0))).numpy()
    assert first.shape == (4096, 16)
    np.testing.assert_allclose(np.sort(first, axis=0), np.sort(x, axis=0))
    again = torch.cat(list(stream.epoch(0))).numpy()
    np.testing.assert_array_equal(first, again)  # an epoch is a function of (seed, epoch)
    assert not np.array_equal(first, torch.cat(list(stream.epoch(1))).numpy())
    skipped = torch.cat(list(stream.epoch(0, skip=20))).numpy()
    np.testing.assert_array_equal(skipped, first[20 * 64 :])


@pytest.mark.parametrize("source", ["shards", "row cache"])
def test_streamed_and_in_memory_training_give_the_same_loss_curve(data, cache, source):
    """Same data, model, seed and step count; only the batch order differs (a shuffling
    buffer of row groups vs a full permutation), so the curves agree within a tolerance,
    not exactly."""
    x, units = data
    phase, model = (
        PhaseConfig(epochs=6, batch_size=64, learning_rate=3e-3),
        ModelConfig(noise="none"),
    )
    val = trainer.as_tensor(x[:512], CPU)
    curves = []
    streamed_from = _stream(units, cache=cache if source == "row cache" else None)
    for stream in (None, streamed_from):
        net = _net()
        x_train = trainer.as_tensor(x, CPU) if stream is None else None
        hist = trainer.finetune(net, x_train, val, phase, model, seed=1, stream=stream)
        curves.append(np.array(hist.val_loss))
        assert hist.samples_seen == 6 * 4096
    memory, streamed = curves
    assert memory[-1] < 0.7 * memory[0]  # it learns
    # Within 10%, or 5% of the starting loss where the curve leaves a plateau (when exactly
    # depends on the batch order).
    np.testing.assert_allclose(streamed, memory, rtol=0.1, atol=0.05 * memory[0])
    assert streamed[-1] == pytest.approx(memory[-1], rel=0.15)


def test_the_step_budget_caps_a_streamed_phase(data):
    _, units = data
    phase = PhaseConfig(epochs=5, batch_size=64, max_samples=64 * 100)
    hist = trainer.finetune(_net(), None, trainer.as_tensor(np.zeros((8, 16)), CPU), phase,
                            ModelConfig(), seed=0, stream=_stream(units))  # fmt: skip
    assert hist.samples_seen == 64 * 100
    assert trainer.step_budget(PhaseConfig(epochs=400, batch_size=1), 10**6, 1, True) == (
        trainer.AUTO_MAX_SAMPLES
    )
    assert trainer.step_budget(PhaseConfig(epochs=3), 1000, 10, False) == 300


class Killed(Exception):
    pass


@pytest.mark.parametrize("source", ["shards", "row cache"])
def test_a_killed_streamed_layer_task_resumes_mid_epoch_from_its_checkpoint(
    data, cache, tmp_path, source
):
    """Layer 2 (inputs through the frozen layer 1, on the fly): killed at step 100 of 128 in
    its second epoch, resumed from its last checkpoint (step 82 of that epoch, 210 overall),
    it ends with the same weights as a run that was never killed."""
    x, units = data
    phase, model = PhaseConfig(epochs=2, batch_size=32), ModelConfig()
    val = trainer.as_tensor(x[:256], CPU)

    def run(checkpoint=None, kill_at=None):
        net = _net()
        trainer.pretrain_layer(net, 0, trainer.as_tensor(x, CPU), val, phase, model, seed=0)

        def on_step(step):
            if step == kill_at:
                raise Killed

        stream = _stream(units, 32, cache=cache if source == "row cache" else None)
        hist = trainer.pretrain_layer(net, 1, None, val, phase, model, seed=1,
                                      stream=stream, checkpoint=checkpoint,
                                      checkpoint_every_steps=30, on_step=on_step)  # fmt: skip
        return net.state_dict(), hist

    reference, ref_hist = run()
    ckpt = tmp_path / "layer_2.ckpt"
    with pytest.raises(Killed):
        run(ckpt, kill_at=128 + 100)
    saved = torch.load(ckpt, weights_only=True)
    assert (saved["epoch"], saved["step"]) == (1, 82)  # step 210 overall: epoch 2, step 82
    resumed, hist = run(ckpt)
    for name, tensor in reference.items():
        torch.testing.assert_close(resumed[name], tensor, rtol=0, atol=0, msg=name)
    assert hist.val_loss == ref_hist.val_loss
    assert hist.train_loss == pytest.approx(ref_hist.train_loss, rel=1e-6)


def test_the_read_ahead_thread_uses_one_intra_op_thread_and_leaves_trainings_alone(data):
    """Two OpenMP teams spinning on the same cores halved streamed training's speed. The
    consumer is a new thread that has run no torch operation yet, as in a fresh task process:
    it must keep torch's default count, and so must threads started after the epoch."""
    _, units = data
    stream = _stream(units)
    original = stream._buffers
    seen = {}

    def spy(epoch):
        seen["read-ahead"] = torch.get_num_threads()
        yield from original(epoch)

    stream._buffers = spy

    def in_new_thread(fn):
        out = []
        thread = threading.Thread(target=lambda: out.append(fn()))
        thread.start()
        thread.join()
        return out[0]

    default = in_new_thread(torch.get_num_threads)

    def consume():
        batches = stream.epoch(0)
        first = next(batches)  # the read-ahead thread has started and set its count
        during = torch.get_num_threads()
        rest = list(batches)
        return 1 + len(rest), first.shape, during

    n, shape, during = in_new_thread(consume)
    assert (n, shape) == (4096 // 64, (64, 16))
    assert seen == {"read-ahead": 1}
    assert during == default
    assert in_new_thread(torch.get_num_threads) == default
