"""Adaptive batching of concurrent requests for the encoder service.

Each request is checked and scaled on its own (``EncoderBundle.prepare``: a bad request fails
before it meets any other), then queued. One worker runs the network on the queue: a batch
starts as soon as the network is free and takes the requests waiting then, up to ``max_rows``
rows (a single larger request runs alone); with ``max_wait`` > 0 it waits up to that long for
more rows first. The requests of a batch share one forward pass; each gets its own rows' outputs
(``EncoderBundle.finish``), in order, and an error in one request's outputs fails only it.
"""

from __future__ import annotations

import asyncio
import sys
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

INLINE_ROWS = 256  # a lone request up to this many rows runs on the event loop's thread


@dataclass
class Job:
    x: np.ndarray  # (rows, features) float64, raw
    xs: np.ndarray  # (rows, features) float32, scaled: the network's input
    index: Any
    output: str
    future: asyncio.Future | None


class Batcher:
    """Merges concurrent ``run`` calls into shared forward passes of ``bundle``'s network."""

    def __init__(
        self,
        bundle,
        max_rows: int = 4096,
        max_wait: float = 0.0,
        observe: Callable[[int, int], None] | None = None,
    ):
        self.bundle, self.max_rows, self.max_wait = bundle, max_rows, max_wait
        self.observe = observe or (lambda rows, requests: None)  # called once per batch
        # the outputs that need the decoder, from the bundle's own runtime module
        self.needs_decode = sys.modules[type(bundle).__module__].NEEDS_DECODE
        self._queue: deque[Job] = deque()
        self._wake: asyncio.Event | None = None
        self._worker: asyncio.Task | None = None
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="sae-batch")
        self._busy = False  # a batch is in the worker thread

    async def run(self, x: np.ndarray, xs: np.ndarray, index: Any, output: str, alone=None):
        """The output frame of one checked request, computed in a batch with its neighbours.

        ``alone()``: whether no other request is in flight. Asked after the requests already
        received have had their turn; if so, with the network idle and a few rows, the forward
        pass runs here: handing a small batch to the worker thread and back costs more (GIL
        hand-offs) than the pass itself."""
        if alone is not None and len(xs) <= INLINE_ROWS and not self._busy:
            await asyncio.sleep(0)  # let requests that arrived meanwhile reach this point
        if (
            alone is not None
            and alone()
            and not self._busy
            and not self._queue
            and (len(xs) <= INLINE_ROWS)
        ):
            self.observe(len(xs), 1)
            (result,) = self._forward([Job(x, xs, index, output, None)])
            if isinstance(result, BaseException):
                raise result
            return result
        loop = asyncio.get_running_loop()
        job = Job(x, xs, index, output, loop.create_future())
        self._queue.append(job)
        if self._worker is None or self._worker.done():
            self._wake = asyncio.Event()
            self._worker = loop.create_task(self._work())
        self._wake.set()
        return await job.future

    def _take(self, room: int) -> list[Job]:
        jobs: list[Job] = []
        while self._queue and (not jobs or len(self._queue[0].xs) <= room):
            jobs.append(self._queue.popleft())
            room -= len(jobs[-1].xs)
        return jobs

    async def _work(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._queue:
                self._wake.clear()
                await self._wake.wait()
            batch = self._take(self.max_rows)
            rows = sum(len(j.xs) for j in batch)
            deadline = loop.time() + self.max_wait
            while rows < self.max_rows and self.max_wait > 0 and loop.time() < deadline:
                if not self._queue:
                    self._wake.clear()
                    try:
                        await asyncio.wait_for(self._wake.wait(), deadline - loop.time())
                    except TimeoutError:
                        break
                more = self._take(self.max_rows - rows)
                if not more:
                    break
                batch += more
                rows += sum(len(j.xs) for j in more)
            self.observe(rows, len(batch))
            self._busy = True
            try:
                results = await loop.run_in_executor(self._pool, self._forward, batch)
            finally:
                self._busy = False
            for job, result in zip(batch, results, strict=True):
                if job.future.done():  # the client went away
                    continue
                if isinstance(result, BaseException):
                    job.future.set_exception(result)
                else:
                    job.future.set_result(result)

    def _forward(self, batch: list[Job]) -> list:
        """One forward pass over the batch's rows; each job's outputs, or its error."""
        xs = batch[0].xs if len(batch) == 1 else np.concatenate([j.xs for j in batch])
        try:
            decode = any(j.output in self.needs_decode for j in batch)
            codes, recon = self.bundle.net.forward(xs, decode=decode)  # (rows, code), (rows, in)
        except Exception as err:  # the network itself: every request of the batch
            return [err] * len(batch)
        results, start = [], 0
        for job in batch:
            end = start + len(job.xs)
            part = None if recon is None else recon[start:end]
            try:
                results.append(
                    self.bundle.finish(job.x, job.xs, codes[start:end], part, job.output, job.index)
                )
            except Exception as err:
                results.append(err)
            start = end
        return results
