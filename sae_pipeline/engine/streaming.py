"""Shuffled float32 mini-batches of a snapshot part, streamed from its shards.

``ShardStream.epoch`` reads the part's row groups in a seeded order (one per epoch), scales each
chunk on the fly (the scaler's per-column affine map, in float32), fills a shuffling buffer of
``buffer_rows`` rows (several row groups), permutes it and cuts it into batches; the rows a
buffer leaves over (fewer than a batch) start the next one, and the epoch's last few are dropped
like the in-memory loop's ragged last batch. A read-ahead thread prepares the next buffers while
the current one trains, so reading, decoding and shuffling overlap compute. On CUDA each buffer
is copied to pinned memory and on to the device with a non-blocking copy.

Memory: about ``(2 + readahead) * buffer_rows * features * 4`` bytes, whatever the data size.
Every epoch's order is a pure function of (seed, epoch), so a resumed task replays it exactly.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch

from sae_pipeline.data import parts
from sae_pipeline.data.batches import prefetch


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
        readahead: int = 2,
    ):
        self.plan, self.columns, self.split, self.part = plan, list(columns), split, part
        self.rows, self.mult, self.add = rows, mult, add
        self.batch = min(batch_size, rows)
        self.seed, self.device = seed, device
        self.buffer_rows = max(buffer_rows, self.batch)
        self.chunk_rows, self.readahead = chunk_rows, readahead

    def _buffers(self, epoch: int) -> Iterator[torch.Tensor]:
        """Shuffled, scaled float32 buffers whose lengths are multiples of the batch size.

        Built with torch operations, which release the GIL (numpy's concatenate and fancy
        indexing hold it): the training loop's Python keeps running while a buffer is built.
        """
        rng = np.random.default_rng([self.seed, epoch])
        order_seed = int(rng.integers(2**63))
        gen = torch.Generator().manual_seed(int(rng.integers(2**63)))
        mult, add = torch.from_numpy(self.mult), torch.from_numpy(self.add)
        pending: list[torch.Tensor] = []
        held = 0
        chunks = parts.iter_part(
            self.plan, self.columns, self.split, self.part, self.chunk_rows, order_seed
        )
        for x, _ in chunks:
            pending.append(torch.from_numpy(x).mul_(mult).add_(add))  # (chunk, features)
            held += len(x)
            if held >= self.buffer_rows:
                buf = torch.cat(pending)
                buf = buf.index_select(0, torch.randperm(len(buf), generator=gen))
                cut = len(buf) // self.batch * self.batch
                pending, held = [buf[cut:]], len(buf) - cut
                yield buf[:cut]
        if held >= self.batch:
            buf = torch.cat(pending)
            buf = buf.index_select(0, torch.randperm(len(buf), generator=gen))
            yield buf[: len(buf) // self.batch * self.batch]

    def _tensors(self, epoch: int) -> Iterator[torch.Tensor]:
        for t in self._buffers(epoch):
            if self.device.type == "cuda":
                t = t.pin_memory()  # in the read-ahead thread: the copy below can overlap
            yield t

    def epoch(self, epoch: int, skip: int = 0) -> Iterator[torch.Tensor]:
        """The epoch's batches, (batch, features) float32 on the device, after ``skip`` batches
        (a resumed task's position)."""
        bs = self.batch
        for block in prefetch(self._tensors(epoch), depth=self.readahead):
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
