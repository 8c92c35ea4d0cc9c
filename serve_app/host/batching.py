"""Per-key dynamic batching: concurrent requests for one key are run together.

`MicroBatcher` queues items per key (a model) and runs them through one `run(key, items)`
call. Items of different keys are never mixed. The policy per key:

- `max_batch_size`: most rows in one batch (an item counts as its number of rows; an item
  bigger than the limit runs alone). 1 turns batching off for the key.
- `max_wait_ms`: how long the first item of a batch may wait for more to arrive when the
  batch is not full. The default 0 adds no wait: an item for an idle key runs at once in
  its caller's own task, and items that arrive while batches run queue up and leave
  together as the next batch.
- `max_in_flight`: batches of one key that may run at once (set by the owner).

If a batch of several items fails as a whole, each item is retried alone, so one bad item
cannot fail the others and every item gets its own error. The batcher knows nothing of Ray
or torch; `run` is injected.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

logger = logging.getLogger(__name__)

K = TypeVar("K", bound=Hashable)
T = TypeVar("T")
R = TypeVar("R")


@dataclass(frozen=True)
class BatchPolicy:
    """How one key is batched (see module docstring)."""

    max_batch_size: int = 32
    max_wait_ms: float = 0.0
    max_in_flight: int = 1

    def __post_init__(self) -> None:
        if self.max_batch_size < 1 or self.max_in_flight < 1 or self.max_wait_ms < 0:
            raise ValueError(f"invalid batch policy {self}")


@dataclass
class _Pending(Generic[T, R]):
    item: T
    rows: int
    future: asyncio.Future[R]


@dataclass
class _Queue(Generic[T, R]):
    policy: BatchPolicy
    pending: deque[_Pending[T, R]] = field(default_factory=deque)
    running: int = 0
    arrived: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def queued_rows(self) -> int:
        return sum(p.rows for p in self.pending)


@dataclass
class BatchStats:
    """Counters since the batcher was created."""

    batches: int = 0
    items: int = 0
    rows: int = 0
    largest_batch: int = 0
    split_retries: int = 0


class MicroBatcher(Generic[K, T, R]):
    """Runs concurrent items of the same key as one batch (see module docstring)."""

    def __init__(
        self,
        run: Callable[[K, list[T]], Awaitable[list[R]]],
        policy: Callable[[K], BatchPolicy],
    ) -> None:
        """`run(key, items)` returns one result per item, in order; `policy(key)` is read
        when a key's queue is created (an idle key's queue is dropped)."""
        self._run = run
        self._policy = policy
        self._queues: dict[K, _Queue[T, R]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self.stats = BatchStats()

    async def submit(self, key: K, item: T, rows: int = 1) -> R:
        """Queue `item` (of `rows` rows) under `key`; return its result or raise its error.

        Cancelling the caller does not cancel a batch already running; its result for this
        item is dropped."""
        queue = self._queues.get(key)
        if queue is None:
            queue = self._queues[key] = _Queue(self._policy(key))
            if queue.policy.max_wait_ms <= 0:
                return await self._run_alone(key, queue, item, max(1, rows))
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        queue.pending.append(_Pending(item, max(1, rows), future))
        queue.arrived.set()
        self._start_drains(key, queue)
        return await future

    async def _run_alone(self, key: K, queue: _Queue[T, R], item: T, rows: int) -> R:
        """An idle key that never waits: run the item in the caller's own task (a lone
        request pays no hand-off); items arriving meanwhile queue for the next batch."""
        queue.running += 1
        self.count([rows])
        try:
            results = await self._run(key, [item])
            if len(results) != 1:
                raise RuntimeError(f"a batch of 1 returned {len(results)} results")
            return results[0]
        finally:
            queue.running -= 1
            self._start_drains(key, queue)
            self._forget_if_idle(key, queue)

    def _start_drains(self, key: K, queue: _Queue[T, R]) -> None:
        while queue.pending and queue.running < queue.policy.max_in_flight:
            queue.running += 1
            task = asyncio.create_task(self._drain(key, queue))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def _forget_if_idle(self, key: K, queue: _Queue[T, R]) -> None:
        if queue.running == 0 and not queue.pending and self._queues.get(key) is queue:
            del self._queues[key]

    async def _drain(self, key: K, queue: _Queue[T, R]) -> None:
        try:
            while queue.pending:
                await self._fill(queue)
                batch = self._take(queue)
                if batch:
                    await self._execute(key, batch)
        finally:
            queue.running -= 1
            self._forget_if_idle(key, queue)

    async def _fill(self, queue: _Queue[T, R]) -> None:
        """Wait up to max_wait_ms for the batch to fill (not at all by default)."""
        policy = queue.policy
        if policy.max_wait_ms <= 0 or policy.max_batch_size <= 1:
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + policy.max_wait_ms / 1000
        while queue.queued_rows < policy.max_batch_size:
            remaining = deadline - loop.time()
            if remaining <= 0:
                return
            queue.arrived.clear()
            try:
                await asyncio.wait_for(queue.arrived.wait(), remaining)
            except TimeoutError:
                return

    @staticmethod
    def _take(queue: _Queue[T, R]) -> list[_Pending[T, R]]:
        batch: list[_Pending[T, R]] = []
        rows = 0
        limit = queue.policy.max_batch_size
        while queue.pending:
            head = queue.pending[0]
            if batch and rows + head.rows > limit:
                break
            queue.pending.popleft()
            if head.future.done():  # the caller went away before its batch started
                continue
            batch.append(head)
            rows += head.rows
        return batch

    def count(self, rows: list[int]) -> None:
        """Count one batch of requests of these sizes (also one run outside the batcher)."""
        self.stats.batches += 1
        self.stats.items += len(rows)
        self.stats.rows += sum(rows)
        self.stats.largest_batch = max(self.stats.largest_batch, len(rows))

    async def _execute(self, key: K, batch: list[_Pending[T, R]]) -> None:
        self.count([p.rows for p in batch])
        try:
            results = await self._run(key, [p.item for p in batch])
            if len(results) != len(batch):
                raise RuntimeError(f"batch of {len(batch)} returned {len(results)} results")
        except asyncio.CancelledError:
            for pending in batch:
                pending.future.cancel()
            raise
        except Exception as exc:  # noqa: BLE001 - handed to the callers, who raise it
            if len(batch) == 1:
                _settle(batch[0].future, error=exc)
                return
            # NOTE: one bad item must not fail the others: run each alone.
            self.stats.split_retries += 1
            logger.info("batch failed; retrying its items one by one", extra={"items": len(batch)})
            for pending in batch:
                try:
                    (result,) = await self._run(key, [pending.item])
                except Exception as item_exc:  # noqa: BLE001 - handed to its caller
                    _settle(pending.future, error=item_exc)
                else:
                    _settle(pending.future, result=result)
            return
        for pending, result in zip(batch, results, strict=True):
            _settle(pending.future, result=result)

    def queued(self, key: K) -> int:
        """Items waiting (not yet running) under `key`."""
        queue = self._queues.get(key)
        return 0 if queue is None else len(queue.pending)

    async def close(self) -> None:
        """Cancel running batches (shutdown)."""
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for queue in self._queues.values():
            for pending in queue.pending:
                pending.future.cancel()
        self._queues.clear()


def _settle(
    future: asyncio.Future[R], result: R | None = None, error: BaseException | None = None
) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)  # type: ignore[arg-type]
