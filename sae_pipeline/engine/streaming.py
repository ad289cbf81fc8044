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


def _transposed(rb, columns: Sequence[str]) -> torch.Tensor:
    """(rows, features) float32, contiguous: the columns stacked (one memcpy each; float32
    Arrow columns need no copy before that), then transposed by torch's blocked copy."""
    cols = [rb.column(c).to_numpy(zero_copy_only=False) for c in columns]
    return torch.from_numpy(np.stack(cols).astype(np.float32, copy=False)).t().contiguous()


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

        Each record batch's columns are stacked, transposed and their part's rows gathered
        straight into one staging tensor, scaled there in place, and the full stage is
        gathered in a random order into the buffer handed out: torch operations, which
        release the GIL (numpy's loops over columns and boolean masks hold it), and three
        passes over the data where concatenating per-chunk copies took six. The rows a buffer
        leaves over (fewer than a batch) move to the front of the stage for the next one.
        """
        rng = np.random.default_rng([self.seed, epoch])
        order_seed = int(rng.integers(2**63))
        gen = torch.Generator().manual_seed(int(rng.integers(2**63)))
        mult, add = torch.from_numpy(self.mult), torch.from_numpy(self.add)
        stage = torch.empty((self.buffer_rows + self.chunk_rows, len(self.columns)))
        held = 0
        batches = parts.iter_batches(
            self.plan, self.columns, self.split, self.part, self.chunk_rows, order_seed
        )
        for rb, keep in batches:
            x = _transposed(rb, self.columns)  # (chunk, features), contiguous
            n = len(x) if keep is None else len(keep)
            rows = stage[held : held + n]
            if keep is None:
                rows.copy_(x)
            else:
                torch.index_select(x, 0, torch.from_numpy(keep), out=rows)
            rows.mul_(mult).add_(add)
            held += n
            if held >= self.buffer_rows:
                perm = torch.randperm(held, generator=gen)
                cut = held // self.batch * self.batch
                out = stage.index_select(0, perm[:cut])
                rest = stage.index_select(0, perm[cut:])
                stage[: len(rest)] = rest
                held = len(rest)
                yield out
        if held >= self.batch:
            perm = torch.randperm(held, generator=gen)
            yield stage.index_select(0, perm[: held // self.batch * self.batch])

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
