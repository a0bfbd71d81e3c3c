"""Dynamic batching: requests that arrive within a few milliseconds of each other share one forward pass.

Every request becomes one or more *items* with a *key* (the model, the operation and every option that
must be equal within a batch: beam size, length penalty, ...). One worker task takes the first waiting
item, then keeps collecting for at most `max_wait_ms` or until `max_batch_size` items are in hand, groups
them by key, and runs each group as one call of `run_batch(key, items)` on a single inference thread, off
the event loop: the server keeps accepting (and refusing) requests while a batch runs, and the requests that
arrive meanwhile form the next batch. One inference thread, not several, because the models are shared and
PyTorch already uses every core inside one call.

`max_batch_size=1` turns batching off (each item is run alone, in arrival order): the load benchmark
compares both.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Hashable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

RunBatch = Callable[[Hashable, list[Any]], list[Any]]


@dataclass
class BatchStats:
    """What the batcher has done: batches run and items in them (the largest batch tells batching works)."""

    batches: int = 0
    items: int = 0
    largest: int = 0

    def record(self, size: int) -> None:
        self.batches += 1
        self.items += size
        self.largest = max(self.largest, size)


class DynamicBatcher:
    """Collects items from concurrent requests and runs them in batches on one inference thread.

    `submit` is awaited by request handlers. The worker task starts with the first submission, on the
    running event loop, so the batcher works under uvicorn and under test clients alike.
    """

    def __init__(self, run_batch: RunBatch, max_batch_size: int = 32, max_wait_ms: float = 5.0) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size={max_batch_size} must be at least 1")
        if max_wait_ms < 0:
            raise ValueError(f"max_wait_ms={max_wait_ms} must be >= 0")
        self.run_batch = run_batch
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_ms / 1000.0
        self._executor: ThreadPoolExecutor | None = None
        self.stats = BatchStats()
        self._queue: asyncio.Queue | None = None
        self._worker: asyncio.Task | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    async def submit(self, key: Hashable, item: Any) -> Any:
        """Queue one item and wait for its result (or the exception its batch raised)."""
        self._ensure_worker()
        future = asyncio.get_running_loop().create_future()
        await self._queue.put((key, item, future))
        return await future

    async def run_alone(self, function: Callable[[], Any]) -> Any:
        """Run `function` on the inference thread, between batches (for work that is never batched)."""
        return await asyncio.get_running_loop().run_in_executor(self.executor, function)

    @property
    def executor(self) -> ThreadPoolExecutor:
        """The inference thread; made again after `close`, since an app may be started more than once
        (each test client runs the app's lifespan)."""
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vaswani-inference")
        return self._executor

    def _ensure_worker(self) -> None:
        loop = asyncio.get_running_loop()
        if self._worker is None or self._worker.done() or self._loop is not loop:
            self._loop, self._queue = loop, asyncio.Queue()
            self._worker = loop.create_task(self._work(), name="vaswani-batcher")

    async def _collect(self) -> list[tuple[Hashable, Any, asyncio.Future]]:
        queue = self._queue
        taken = [await queue.get()]
        deadline = time.monotonic() + self.max_wait_s
        while len(taken) < self.max_batch_size:
            if not queue.empty():  # what arrived while the last batch ran joins at once
                taken.append(queue.get_nowait())
                continue
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                taken.append(await asyncio.wait_for(queue.get(), remaining))
            except asyncio.TimeoutError:  # not the builtin before Python 3.11
                break
        return taken

    async def _work(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            taken = await self._collect()
            groups: dict[Hashable, list[tuple[Any, asyncio.Future]]] = {}
            for key, item, future in taken:
                if not future.done():  # a client that went away needs no answer
                    groups.setdefault(key, []).append((item, future))
            for key, members in groups.items():
                items = [item for item, _ in members]
                self.stats.record(len(items))
                try:
                    results = await loop.run_in_executor(self.executor, self.run_batch, key, items)
                    if len(results) != len(items):
                        raise RuntimeError(f"a batch of {len(items)} items gave {len(results)} results")
                except Exception as error:  # the batch's own requests get it; the worker goes on
                    for _, future in members:
                        if not future.done():
                            future.set_exception(error)
                    continue
                for (_, future), result in zip(members, results, strict=True):
                    if not future.done():
                        future.set_result(result)

    def close(self) -> None:
        """Stop the worker and the inference thread (the app's shutdown); a later `submit` starts both."""
        if self._worker is not None:
            self._worker.cancel()
            self._worker = None
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None
