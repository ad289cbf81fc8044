"""The streaming path's GPU side: pinned host buffers allocated once, copies on a side stream.

``ShardStream`` gathers each shuffled buffer straight into a pinned host buffer of a
``PinnedRing`` (no ``pin_memory()`` copy of a pageable one), and ``to_device`` copies the
next buffer to the GPU on a side stream as soon as the consumer takes it, so that the copy
overlaps the training of the buffer before. A host buffer goes back to the ring once the
copy that read it has finished; the read-ahead thread waits for that before reusing it.
"""

from __future__ import annotations

import queue
from collections.abc import Iterator

import torch


class PinnedRing:
    """``count`` host buffers of ``shape`` (pinned where ``pin``), allocated once and handed
    out in turn; a buffer comes back with ``release(buffer, done)`` and is reused only after
    ``done`` (the event of the copy that read it) has completed."""

    def __init__(self, shape: tuple[int, int], count: int, pin: bool = True):
        self.buffers = [torch.empty(shape, pin_memory=pin) for _ in range(count)]
        self._done: dict[int, object] = {}  # data pointer -> the last copy's event
        self._free: queue.Queue = queue.Queue()
        self.closed = False

    def reset(self) -> None:
        """Every buffer free again (an epoch's start: the last epoch's read-ahead has ended)."""
        self._free = queue.Queue()
        for b in self.buffers:
            self._free.put(b)
        self.closed = False

    def close(self) -> None:
        """Stop handing out buffers: a read-ahead thread waiting in ``take`` gives up."""
        self.closed = True

    def take(self) -> torch.Tensor:
        """The next free buffer, once the copy that last read it has finished."""
        while True:
            try:
                buf = self._free.get(timeout=0.1)
                break
            except queue.Empty:
                if self.closed:
                    raise RuntimeError("the stream was closed") from None
        done = self._done.pop(buf.data_ptr(), None)
        if done is not None:
            done.synchronize()
        return buf

    def release(self, block: torch.Tensor, done=None) -> None:
        """Give back the buffer ``block`` is a view of (from its first row)."""
        for b in self.buffers:
            if b.data_ptr() == block.data_ptr():
                if done is not None:
                    self._done[b.data_ptr()] = done
                self._free.put(b)
                return
        raise ValueError("not a buffer of this ring")


def to_device(
    blocks: Iterator[torch.Tensor], device: torch.device, ring: PinnedRing, skip_rows: int = 0
) -> Iterator[torch.Tensor]:
    """``blocks`` (host buffers of ``ring``) on ``device``, less their first ``skip_rows``
    rows: block i+1 is copied on a side stream while the consumer trains on block i."""
    side = torch.cuda.Stream(device)
    current = torch.cuda.current_stream(device)
    pending = None
    for host in blocks:
        if skip_rows >= len(host):  # a resumed task's position: never copied
            skip_rows -= len(host)
            ring.release(host)
            continue
        rows, skip_rows = host[skip_rows:], 0
        with torch.cuda.stream(side):
            block = rows.to(device, non_blocking=True, copy=True)  # (rows, features)
            copied = torch.cuda.Event()
            copied.record(side)
        ring.release(host, copied)
        if pending is not None:
            yield _ready(*pending, current)
        pending = (block, copied)
    if pending is not None:
        yield _ready(*pending, current)


def _ready(block: torch.Tensor, copied, current) -> torch.Tensor:
    """``block`` usable on the current stream: its copy waited for, its memory kept from the
    side stream's allocator until the current stream's work on it is done."""
    current.wait_event(copied)
    block.record_stream(current)
    return block
