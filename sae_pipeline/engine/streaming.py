"""Shuffled float32 mini-batches of a snapshot part, streamed from its shards.

``ShardStream.epoch`` reads the part's chunks in a seeded order (one per epoch): slices of
``slice_rows`` rows of its row cache's files (``data.row_cache``, row-major float32, what
``fit_scaler`` writes, scaled) or, without one, the snapshot's row groups, which it scales
chunk by chunk as serving does (``scaler``: in float64, then rounded to float32; ``mult`` and
``add``, a per-column affine map in float32, when no scaler is given). It fills a shuffling
buffer of
``buffer_rows`` rows (several chunks; an epoch's first buffers are smaller, doubling up to
it, so that training starts early),
permutes it and cuts it into batches; the rows a buffer leaves over (fewer than a batch) start
the next one, and the epoch's last few are dropped like the in-memory loop's ragged last batch.
A read-ahead thread prepares the next buffers while the current one trains, so reading and
shuffling overlap compute; it runs torch on one intra-op thread, leaving the others to
training. On CUDA (``_gpu``) the buffers are pinned host buffers allocated once per stream and
gathered into directly, each copied to the device on a side stream as soon as the consumer
takes it, while the block before trains; and ``readers`` threads read a buffer's chunks at
once (the training loop needs little CPU there). On the CPU nothing of that changes.

Memory: ``(3 + readahead) * (buffer_rows + chunk) * features * 4`` bytes (a chunk: a slice of
the row cache or a row group), for the stage and the buffers alive at once (one being filled,
``readahead`` waiting, one training), whatever the data size.
Every epoch's order is a pure function of (seed, epoch), so a resumed task replays it exactly.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch

from sae_pipeline.data import parts
from sae_pipeline.data.batches import prefetch
from sae_pipeline.data.row_cache import RowCache
from sae_pipeline.data.scaling import apply_scaler


def _scaled(rb, columns: Sequence[str], scaler) -> torch.Tensor:
    """(rows, features) float32: the chunk scaled in float64 (one vectorised pass per chunk,
    the serving transform), then rounded."""
    return torch.from_numpy(apply_scaler(scaler, parts.features(rb, columns)))


def _transposed(rb, columns: Sequence[str]) -> torch.Tensor:
    """(rows, features) float32, a transposed view of the stacked columns (one memcpy each;
    float32 Arrow columns need no copy before that). The gather into the stage transposes it:
    one pass, where making it contiguous first took two (measured 40% less time per chunk)."""
    cols = [rb.column(c).to_numpy(zero_copy_only=False) for c in columns]
    return torch.from_numpy(np.stack(cols).astype(np.float32, copy=False)).t()


@contextlib.contextmanager
def _read_ahead(items: Iterator[torch.Tensor], depth: int) -> Iterator[Iterator[torch.Tensor]]:
    """``prefetch(items)``, its thread running torch on one intra-op thread; leaving the block
    joins that thread.

    With the default, one per core, the read-ahead's OpenMP team and the training loop's spun
    on the same cores: at 1M rows on 2 cores, streaming ran at 63% of the in-memory speed, and
    at 94-100% with one (docs/engine-scaling.md, run 11). Under OpenMP the count applies to
    the calling thread, but torch also keeps it as the default that a thread takes on its first
    parallel operation: the caller's own count is read first (a fresh task process otherwise
    trained on the read-ahead's 1) and set back on the way out, restoring that default.
    """
    threads = torch.get_num_threads()
    blocks = prefetch(items, depth, setup=lambda: torch.set_num_threads(1))
    try:
        with contextlib.closing(blocks):
            yield blocks
    finally:
        torch.set_num_threads(threads)


def _readers(n: int) -> ThreadPoolExecutor | None:
    """A pool of ``n`` reader threads, each on one intra-op thread; None for one (inline)."""
    if n <= 1:
        return None
    return ThreadPoolExecutor(n, "sae-reader", initializer=lambda: torch.set_num_threads(1))


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
        buffer_rows: int = 131_072,
        chunk_rows: int = 65_536,
        slice_rows: int = 16_384,
        readahead: int = 2,
        cache: RowCache | None = None,
        readers: int | None = None,
        scaler: Any = None,
    ):
        self.plan, self.columns, self.split, self.part = plan, list(columns), split, part
        self.rows, self.mult, self.add = rows, mult, add
        self.cache = cache  # the part's rows as row-major files (``data.row_cache``), if any
        self.scaler = scaler  # scales the snapshot's chunks in float64 (serving's transform)
        # mult/add (float32) only where the rows come unscaled and no scaler is given.
        self.affine = not (cache.scaled if cache is not None else scaler is not None)
        self.batch = min(batch_size, rows)
        self.seed, self.device = seed, device
        self.buffer_rows = max(buffer_rows, self.batch)
        self.chunk_rows, self.slice_rows, self.readahead = chunk_rows, slice_rows, readahead
        # An epoch's first buffer is smaller, and the next ones double up to ``buffer_rows``:
        # training starts after one chunk is read, not a whole buffer (the read-ahead thread
        # overlaps the rest). Measured at 1M rows: a full first buffer took 0.3-0.6 s, as much
        # as a sixth of a 2-thread epoch, with nothing else to do.
        self.first_rows = max(self.batch, min(self.buffer_rows, chunk_rows))
        # Threads reading one buffer's chunks: 1 on the CPU, where training needs the cores
        # (docs/engine-scaling.md); on CUDA several, so that the reads keep up with the GPU.
        cuda = device.type == "cuda"
        self.readers = readers or (min(4, max(2, (os.cpu_count() or 2) - 1)) if cuda else 1)
        self._ring = None  # CUDA: the pinned buffers (_gpu.PinnedRing), made on first use

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
            if self.scaler is not None:
                x = _scaled(rb, self.columns, self.scaler)  # (chunk, features)
            else:
                x = _transposed(rb, self.columns)  # (chunk, features), a transposed view
            if keep is None:
                yield len(x), lambda out, x=x: out.copy_(x)
            else:
                idx = torch.from_numpy(keep)
                yield len(idx), lambda out, x=x, idx=idx: torch.index_select(x, 0, idx, out=out)

    def _buffers(self, epoch: int) -> Iterator[torch.Tensor]:
        """Shuffled, scaled float32 buffers whose lengths are multiples of the batch size.

        Each chunk's rows are written straight into one staging tensor (read from the row
        cache, or gathered from a record batch's columns), scaled there in place, and the
        full stage is gathered in a random order into the buffer handed out: torch
        operations and file reads, which release the GIL, so the read-ahead thread does not
        hold up the training loop's Python. The rows a buffer leaves over (fewer than a
        batch) move to the front of the stage for the next one.
        """
        rng = np.random.default_rng([self.seed, epoch])
        order_seed = int(rng.integers(2**63))
        gen = torch.Generator().manual_seed(int(rng.integers(2**63)))
        mult, add = torch.from_numpy(self.mult), torch.from_numpy(self.add)
        piece = self.slice_rows if self.cache is not None else self.chunk_rows
        width = len(self.columns)
        stage = torch.empty((self.buffer_rows + piece, width))
        held, target = 0, self.first_rows
        pool = _readers(self.readers)
        pending = []

        def load(rows: torch.Tensor, fill) -> None:
            fill(rows)
            if self.affine:
                rows.mul_(mult).add_(add)

        for n, fill in self._sources(order_seed):
            rows = stage[held : held + n]
            if pool is None:
                load(rows, fill)
            else:  # chunks into disjoint rows of the stage, all read before the shuffle
                pending.append(pool.submit(load, rows, fill))
            held += n
            if held >= target:
                for done in pending:
                    done.result()
                pending.clear()
                target = min(self.buffer_rows, 2 * target)
                perm = torch.randperm(held, generator=gen)
                cut = held // self.batch * self.batch
                out = self._buffer(stage)[:cut]
                torch.index_select(stage, 0, perm[:cut], out=out)
                rest = stage.index_select(0, perm[cut:])
                stage[: len(rest)] = rest
                held = len(rest)
                yield out
        for done in pending:
            done.result()
        if pool is not None:
            pool.shutdown()
        if held >= self.batch:
            perm = torch.randperm(held, generator=gen)
            cut = held // self.batch * self.batch
            yield torch.index_select(stage, 0, perm[:cut], out=self._buffer(stage)[:cut])

    def _buffer(self, stage: torch.Tensor) -> torch.Tensor:
        """A new buffer the stage's size, whatever the rows it will hold: buffers of varying
        sizes left the allocator's heap fragmented (peak memory varied by 0.1 GiB between
        runs of the same step); one size above the allocator's mmap threshold (32 MiB at 64
        features) is mapped and unmapped whole. A new one each time, not a ring reused: a
        consumer may keep the batches it was given. On CUDA: the next pinned host buffer of the
        ring, gathered into directly, then copied to the device (the consumer keeps copies)."""
        if self._ring is not None:
            return self._ring.take()
        return torch.empty_like(stage)

    def epoch(self, epoch: int, skip: int = 0) -> Iterator[torch.Tensor]:
        """The epoch's batches, (batch, features) float32 on the device, after ``skip`` batches
        (a resumed task's position)."""
        bs = self.batch
        if self.device.type == "cuda":
            from sae_pipeline.engine import _gpu

            if self._ring is None:  # the stage's size; the read-ahead's buffers in flight + 3
                piece = self.slice_rows if self.cache is not None else self.chunk_rows
                shape = (self.buffer_rows + piece, len(self.columns))
                self._ring = _gpu.PinnedRing(shape, self.readahead + 3)
            self._ring.reset()
        with _read_ahead(self._buffers(epoch), self.readahead) as blocks:
            if self._ring is not None:
                blocks = _gpu.to_device(blocks, self.device, self._ring, skip * bs)
                skip = 0
            try:
                for block in blocks:
                    n = len(block) // bs
                    if skip >= n:
                        skip -= n
                        continue
                    block = block[skip * bs :]
                    skip = 0
                    for i in range(0, len(block), bs):
                        yield block[i : i + bs]
            finally:
                if self._ring is not None:
                    self._ring.close()  # a read-ahead thread waiting for a buffer stops
