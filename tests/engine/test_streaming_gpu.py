"""The streaming path's GPU side, exercised on the CPU: pinned buffers allocated once and
gathered into directly, copies on a side stream (stand-in streams and events), several
reader threads; each gives the very batches of the plain CPU path."""

from __future__ import annotations

import threading

import numpy as np
import pandas as pd
import pytest
import torch

from sae_pipeline.data import parts, row_cache
from sae_pipeline.data.batches import prefetch
from sae_pipeline.engine import _gpu
from sae_pipeline.engine.streaming import ShardStream

CPU = torch.device("cpu")
COLUMNS = [f"f{i}" for i in range(8)]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    x = np.random.default_rng(0).random((2048, 8), dtype=np.float32)
    folder = tmp_path_factory.mktemp("shards")
    path = folder / "part-0.parquet"
    pd.DataFrame(x, columns=COLUMNS).to_parquet(path, row_group_size=256)
    cache = row_cache.write(str(folder / "cache"), [x], 8, file_rows=300)
    return parts.units([str(path)]), cache


def _stream(data, source, readers=None):
    units, cache = data
    ones, zeros = np.ones(8, np.float32), np.zeros(8, np.float32)
    return ShardStream(units, COLUMNS, None, "train", 2048, ones, zeros, 64, 0, CPU, 512,
                       chunk_rows=256, slice_rows=100, readers=readers,
                       cache=cache if source == "row cache" else None)  # fmt: skip


@pytest.mark.parametrize("source", ["shards", "row cache"])
def test_several_readers_give_the_same_batches_as_one(data, source, monkeypatch):
    threads = set()
    real = row_cache.RowCache.read_into

    def spy(self, *args):
        threads.add(threading.current_thread().name)
        return real(self, *args)

    monkeypatch.setattr(row_cache.RowCache, "read_into", spy)
    one = torch.cat(list(_stream(data, source, readers=1).epoch(3))).numpy()
    threads.clear()
    three = torch.cat(list(_stream(data, source, readers=3).epoch(3))).numpy()
    np.testing.assert_array_equal(three, one)
    if source == "row cache":
        assert len({t for t in threads if t.startswith("sae-reader")}) > 1, threads


def test_one_reader_on_the_cpu_and_several_on_cuda():
    units = []
    kw = dict(plan=units, columns=COLUMNS, split=None, part="train", rows=10,
              mult=np.ones(8), add=np.zeros(8), batch_size=2, seed=0)  # fmt: skip
    assert ShardStream(**kw, device=CPU).readers == 1  # the CPU path is unchanged
    assert ShardStream(**kw, device=torch.device("cuda")).readers >= 2


class _Event:
    def __init__(self):
        self.recorded = self.synced = 0

    def record(self, stream):
        self.recorded += 1

    def synchronize(self):
        self.synced += 1


class _Stream:
    def __init__(self, *args):
        self.waited = []

    def wait_event(self, event):
        assert event.recorded, "waited for a copy never issued"
        self.waited.append(event)


@pytest.fixture
def fake_cuda(monkeypatch):
    """CUDA's stream API, stood in for: the copies are CPU copies, the order is checked."""
    import contextlib

    current, events, kept = _Stream(), [], []

    def event():
        events.append(_Event())
        return events[-1]

    monkeypatch.setattr(torch.cuda, "Stream", _Stream)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: current)
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "Event", event)
    monkeypatch.setattr(torch.Tensor, "record_stream", lambda t, s: kept.append(s))
    return current, events, kept


@pytest.mark.parametrize("skip", [0, 5, 11])
def test_pinned_buffers_are_allocated_once_and_copied_on_a_side_stream(data, fake_cuda, skip):
    current, events, kept = fake_cuda
    want = torch.cat(list(_stream(data, "row cache").epoch(1, skip=skip)))
    stream = _stream(data, "row cache")
    stream._ring = ring = _gpu.PinnedRing((512 + 100, 8), stream.readahead + 3, pin=False)
    buffers = {b.data_ptr() for b in ring.buffers}
    handed = []
    real_take = ring.take

    def take():
        handed.append(real_take())
        return handed[-1]

    ring.take = take
    for _ in range(2):  # two epochs: the same buffers
        ring.reset()
        blocks = _gpu.to_device(prefetch(stream._buffers(1), 2), CPU, ring, skip * 64)
        got = torch.cat([b.clone() for b in blocks])
        np.testing.assert_array_equal(got.numpy(), want.numpy())
    assert {b.data_ptr() for b in handed} <= buffers and len(handed) > len(buffers)
    assert len(current.waited) == len(kept) > 0  # every block waited for and kept on current
    assert all(e.recorded == 1 for e in events)
    assert sum(e.synced for e in events) > 0  # a buffer was reused only after its copy


def test_a_closed_ring_stops_a_reader_waiting_for_a_buffer():
    ring = _gpu.PinnedRing((4, 2), 1, pin=False)
    ring.reset()
    first = ring.take()
    ring.close()
    with pytest.raises(RuntimeError, match="closed"):
        ring.take()
    ring.release(first)
    ring.reset()
    assert ring.take().data_ptr() == first.data_ptr()


@pytest.mark.parametrize("source", ["shards", "row cache"])
def test_a_cuda_stream_epoch_wires_the_ring_and_the_side_stream(data, fake_cuda, monkeypatch,
                                                                source):  # fmt: skip
    """ShardStream.epoch's CUDA branch, run on the CPU: unpinned ring, CPU copies."""
    import functools

    real_to_device = _gpu.to_device
    monkeypatch.setattr(_gpu, "PinnedRing", functools.partial(_gpu.PinnedRing, pin=False))
    monkeypatch.setattr(_gpu, "to_device", lambda b, d, r, s: real_to_device(b, CPU, r, s))
    want = torch.cat(list(_stream(data, source, readers=1).epoch(2, skip=3)))
    stream = _stream(data, source)
    stream.device = torch.device("cuda")
    got = torch.cat([b.clone() for b in stream.epoch(2, skip=3)])
    np.testing.assert_array_equal(got.numpy(), want.numpy())
    ring = stream._ring
    assert ring is not None and len(ring.buffers) == stream.readahead + 3
    first = [b.data_ptr() for b in ring.buffers]
    batches = stream.epoch(0)  # stopped early, as a step budget does: no thread left waiting
    for _ in range(3):
        next(batches)
    batches.close()
    assert ring.closed and [b.data_ptr() for b in stream._ring.buffers] == first
    assert not [t for t in threading.enumerate() if t.name == "sae-prefetch"]
