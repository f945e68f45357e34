"""Micro-batching: frames that arrive together are scored in one onnxruntime call.

A batch of 8 costs less per image than 8 calls of one (on the 2-core development CPU,
1.08-1.35x less for the toolkit's detectors: ``benchmarks/results/service_load/batch_cost.md``;
more on wider CPUs and GPUs), so under load the service trades a few milliseconds of waiting
(``wait_s``) for throughput. One worker task
collects up to ``max_batch`` queued frames, groups them by shape (only same-size frames
stack into one (N, H, W, 3) array), runs ``predict`` in a thread (onnxruntime releases the
GIL, so the event loop keeps accepting requests meanwhile) and resolves each frame's future.

asyncio, numpy and the runtime's shape grouping: no web stack, no torch.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from anomalykit.export.runtime import group_by_shape

Predict = Callable[[np.ndarray], dict[str, np.ndarray]]


class QueueFull(Exception):
    """More than ``max_queue`` images are already waiting; the client should retry later."""


@dataclass
class _Item:
    image: np.ndarray                 # (H, W, 3) uint8 RGB
    future: asyncio.Future


@dataclass
class Scored:
    """One frame's result: ``outputs`` maps each model output to this frame's row
    (``score`` a 0-d array, ``anomaly_map`` (1, H, W)...); ``batch_size`` = frames in its call."""

    outputs: dict[str, np.ndarray]
    batch_size: int


class MicroBatcher:
    """Queue of frames in front of one ``predict((N, H, W, 3) uint8) -> {name: (N, ...)}``.

    ``max_batch=1`` turns batching off (one frame per call, still one call at a time).
    ``depth`` counts frames accepted and not yet answered (waiting or running); ``submit``
    raises :class:`QueueFull` when it would exceed ``max_queue``. ``on_batch(size, seconds)``
    is called after every model call (metrics). A failing call fails only its own frames.
    """

    def __init__(self, predict: Predict, *, max_batch: int = 8, wait_s: float = 0.005,
                 max_queue: int = 32, on_batch: Callable[[int, float], None] | None = None) -> None:
        if max_batch < 1 or max_queue < 1 or wait_s < 0:
            raise ValueError(f"need max_batch >= 1, max_queue >= 1, wait_s >= 0; got {max_batch}, "
                             f"{max_queue}, {wait_s}")
        self.predict = predict
        self.max_batch = max_batch
        self.wait_s = wait_s
        self.max_queue = max_queue
        self.on_batch = on_batch
        self.depth = 0
        self._queue: asyncio.Queue[_Item] | None = None
        self._worker: asyncio.Task | None = None
        # One inference thread: the model parallelises inside a call (intra-op threads).
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="inference")

    async def start(self) -> None:
        self._queue = asyncio.Queue()
        self._full = asyncio.Event()
        self._worker = asyncio.create_task(self._run(), name="micro-batcher")

    async def stop(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker
        while self._queue is not None and not self._queue.empty():
            item = self._queue.get_nowait()
            if not item.future.done():
                item.future.set_exception(RuntimeError("the service is shutting down"))
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def submit(self, image: np.ndarray) -> Scored:
        """Queue one (H, W, 3) uint8 RGB frame and wait for its result."""
        if self._queue is None:
            raise RuntimeError("MicroBatcher.start() was not called")
        if self.depth >= self.max_queue:
            raise QueueFull(f"{self.depth} images are waiting (limit {self.max_queue})")
        item = _Item(image, asyncio.get_running_loop().create_future())
        self.depth += 1
        self._queue.put_nowait(item)
        if self._queue.qsize() >= self.max_batch - 1:  # with the one the worker holds: full
            self._full.set()
        return await item.future

    async def _run(self) -> None:
        assert self._queue is not None
        while True:
            batch = [await self._queue.get()]
            # The batching window: wait up to wait_s for companions, less if a batch fills.
            # Waiting on an Event (not on queue.get) so a timeout can never drop an item.
            if self.max_batch > 1 and self.wait_s > 0 and self._queue.qsize() < self.max_batch - 1:
                self._full.clear()
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._full.wait(), self.wait_s)
            while len(batch) < self.max_batch and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            await self._run_batch(batch)

    async def _run_batch(self, batch: list[_Item]) -> None:
        live = []
        for item in batch:
            if item.future.done():  # the client gave up (timeout, disconnect) while waiting
                self.depth -= 1
            else:
                live.append(item)
        loop = asyncio.get_running_loop()
        for indices in group_by_shape([item.image for item in live]):
            items = [live[i] for i in indices]
            start = time.perf_counter()
            try:
                stacked = np.stack([item.image for item in items])
                outputs = await loop.run_in_executor(self._executor, self.predict, stacked)
            except Exception as exc:  # noqa: BLE001 - fail these frames, keep serving the rest
                for item in items:
                    if not item.future.done():
                        item.future.set_exception(exc)
            else:
                for row, item in enumerate(items):
                    if not item.future.done():
                        item.future.set_result(Scored(_row(outputs, row), len(items)))
                if self.on_batch is not None:
                    self.on_batch(len(items), time.perf_counter() - start)
            finally:
                self.depth -= len(items)


def _row(outputs: dict[str, Any], row: int) -> dict[str, np.ndarray]:
    return {name: np.asarray(value)[row] for name, value in outputs.items()}
