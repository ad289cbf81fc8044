"""Shuffled float32 mini-batches of a snapshot part, streamed from its shards.

``ShardStream.epoch`` reads the part's chunks in a seeded order (one per epoch): slices of
``slice_rows`` rows of its row cache's files (``data.row_cache``, row-major float32, what
``fit_scaler`` writes) or, without one, the snapshot's row groups. It scales each chunk on the
fly (the scaler's per-column affine map, in float32), fills a shuffling buffer of
``buffer_rows`` rows (several chunks; an epoch's first buffers are smaller, doubling up to
it, so that training starts early),
permutes it and cuts it into batches; the rows a buffer leaves over (fewer than a batch) start
the next one, and the epoch's last few are dropped like the in-memory loop's ragged last batch.
A read-ahead thread prepares the next buffers while the current one trains, so reading and
shuffling overlap compute. On CUDA each buffer is copied to pinned memory and on to the device
with a non-blocking copy.

Two ways to hand buffers out. ``epoch(e)`` allocates a new one for each, so a consumer may keep
the batches it was given. ``epoch(e, reuse=True)``, what the trainer uses, fills a ring of
``readahead + 2`` buffers allocated (and touched) once per stream: a batch is valid until the
consumer asks for the next one, and writing into memory the process already holds is about
4x faster than into new pages (a 131,072-row gather: 10 ms against 35-39 ms).

Memory: ``(3 + readahead) * (buffer_rows + chunk) * features * 4`` bytes (a chunk: a slice of
the row cache or a row group), for the stage and the buffers alive at once (one being filled,
``readahead`` waiting, one training), whatever the data size; with ``reuse`` it is exactly
that (the pool), held for the stream's life.
Every epoch's order is a pure function of (seed, epoch), so a resumed task replays it exactly.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch

from sae_pipeline.data import parts
from sae_pipeline.data.batches import prefetch
from sae_pipeline.data.row_cache import RowCache


def _transposed(rb, columns: Sequence[str]) -> torch.Tensor:
    """(rows, features) float32, a transposed view of the stacked columns (one memcpy each;
    float32 Arrow columns need no copy before that). The gather into the stage transposes it:
    one pass, where making it contiguous first took two (measured 40% less time per chunk)."""
    cols = [rb.column(c).to_numpy(zero_copy_only=False) for c in columns]
    return torch.from_numpy(np.stack(cols).astype(np.float32, copy=False)).t()


class ShardStream:
    """The training batches of one part of a snapshot; ``rows`` is the part's size."""

    def __init__(
        self,
        plan: list[parts.Unit],
        columns: Sequence[str],
        split: parts.HashSplit | None,
        part: str,
        rows: int,
        mult: np.ndarray,
        add: np.ndarray,
        batch_size: int,
        seed: int,
        device: torch.device,
        buffer_rows: int = 262_144,
        chunk_rows: int = 65_536,
        slice_rows: int = 65_536,
        readahead: int = 2,
        cache: RowCache | None = None,
    ):
        self.plan, self.columns, self.split, self.part = plan, list(columns), split, part
        self.rows, self.mult, self.add = rows, mult, add
        self.cache = cache  # the part's rows as row-major files (``data.row_cache``), if any
        self.batch = min(batch_size, rows)
        self.seed, self.device = seed, device
        self.buffer_rows = max(buffer_rows, self.batch)
        self.chunk_rows, self.slice_rows, self.readahead = chunk_rows, slice_rows, readahead
        # An epoch's first buffer is smaller, and the next ones double up to ``buffer_rows``:
        # training starts after one chunk is read, not a whole buffer (the read-ahead thread
        # overlaps the rest). Measured at 1M rows: a full first buffer took 0.3-0.6 s, as much
        # as a sixth of a 2-thread epoch, with nothing else to do.
        self.first_rows = max(self.batch, min(self.buffer_rows, chunk_rows))
        self._pool: tuple[torch.Tensor, list[torch.Tensor]] | None = None  # see ``_stage``

    def _sources(self, order_seed: int) -> Iterator[tuple[int, Callable[[torch.Tensor], Any]]]:
        """(rows, fill) per chunk of the part in the epoch's order: ``fill(out)`` writes the
        chunk's unscaled rows into ``out`` (rows x features, contiguous)."""
        if self.cache is not None:
            cache = self.cache
            for name, start, n in cache.slices_in_order(order_seed, self.slice_rows):
                yield (
                    n,
                    lambda out, name=name, start=start: cache.read_into(name, out.numpy(), start),
                )
            return
        batches = parts.iter_batches(
            self.plan, self.columns, self.split, self.part, self.chunk_rows, order_seed
        )
        for rb, keep in batches:
            x = _transposed(rb, self.columns)  # (chunk, features), a transposed view
            if keep is None:
                yield len(x), lambda out, x=x: out.copy_(x)
            else:
                idx = torch.from_numpy(keep)
                yield len(idx), lambda out, x=x, idx=idx: torch.index_select(x, 0, idx, out=out)

    def _buffers(self, epoch: int, reuse: bool = False) -> Iterator[torch.Tensor]:
        """Shuffled, scaled float32 buffers whose lengths are multiples of the batch size.

        Each chunk's rows are written straight into one staging tensor (read from the row
        cache, or gathered from a record batch's columns), scaled there in place, and the
        full stage is gathered in a random order into the buffer handed out: torch
        operations and file reads, which release the GIL, so the read-ahead thread does not
        hold up the training loop's Python. The rows a buffer leaves over (fewer than a
        batch) move to the front of the stage for the next one. With ``reuse`` the buffers
        are the ring's, in turn.
        """
        rng = np.random.default_rng([self.seed, epoch])
        order_seed = int(rng.integers(2**63))
        gen = torch.Generator().manual_seed(int(rng.integers(2**63)))
        mult, add = torch.from_numpy(self.mult), torch.from_numpy(self.add)
        stage, ring = self._stage(reuse)
        held, target, turn = 0, self.first_rows, 0
        for n, fill in self._sources(order_seed):
            rows = stage[held : held + n]
            fill(rows)
            rows.mul_(mult).add_(add)
            held += n
            if held >= target:
                target = min(self.buffer_rows, 2 * target)
                perm = torch.randperm(held, generator=gen)
                cut = held // self.batch * self.batch
                out = self._gather(stage, perm[:cut], ring, turn)
                rest = stage.index_select(0, perm[cut:])
                stage[: len(rest)] = rest
                held, turn = len(rest), turn + 1
                yield out
        if held >= self.batch:
            perm = torch.randperm(held, generator=gen)
            cut = held // self.batch * self.batch
            yield self._gather(stage, perm[:cut], ring, turn)

    def _stage(self, reuse: bool) -> tuple[torch.Tensor, list[torch.Tensor] | None]:
        """The staging tensor and, with ``reuse``, the ring of buffers: made and touched once
        per stream (``readahead + 2``: one training, ``readahead`` queued, one being filled).
        Without ``reuse``, a new stage per epoch and no ring."""
        piece = self.slice_rows if self.cache is not None else self.chunk_rows
        shape = (self.buffer_rows + piece, len(self.columns))
        if not reuse:
            return torch.empty(shape), None
        if self._pool is None:
            stage = torch.zeros(shape)
            self._pool = stage, [torch.zeros(shape) for _ in range(self.readahead + 2)]
        return self._pool

    @staticmethod
    def _gather(
        stage: torch.Tensor, rows: torch.Tensor, ring: list[torch.Tensor] | None, turn: int
    ) -> torch.Tensor:
        """``stage[rows]`` into the ring's next buffer, or into a new buffer the stage's size
        (whatever the rows it will hold: buffers of varying sizes left the allocator's heap
        fragmented, peak memory varying by 0.1 GiB between runs of the same step; one size
        above the allocator's mmap threshold, 32 MiB at 64 features, is mapped and unmapped
        whole)."""
        target = torch.empty_like(stage) if ring is None else ring[turn % len(ring)]
        return torch.index_select(stage, 0, rows, out=target[: len(rows)])

    def _tensors(self, epoch: int, reuse: bool) -> Iterator[torch.Tensor]:
        for t in self._buffers(epoch, reuse):
            if self.device.type == "cuda":
                t = t.pin_memory()  # in the read-ahead thread: the copy below can overlap
            yield t

    def epoch(self, epoch: int, skip: int = 0, reuse: bool = False) -> Iterator[torch.Tensor]:
        """The epoch's batches, (batch, features) float32 on the device, after ``skip`` batches
        (a resumed task's position).

        ``reuse``: the buffers are a ring the stream keeps, so a batch is valid only until the
        next one is asked for, and the caller must ``close()`` the iterator (which joins the
        read-ahead thread) before starting another epoch of the same stream.
        """
        bs = self.batch
        blocks = prefetch(self._tensors(epoch, reuse), depth=self.readahead)
        with contextlib.closing(blocks):  # closing this iterator joins the read-ahead thread
            for block in blocks:
                n = len(block) // bs
                if skip >= n:
                    skip -= n
                    continue
                block = block[skip * bs :]
                skip = 0
                if self.device.type == "cuda":
                    block = block.to(self.device, non_blocking=True)
                for i in range(0, len(block), bs):
                    yield block[i : i + bs]
