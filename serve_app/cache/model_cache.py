"""The model cache of one replica: a byte budget, LRU eviction, leases and single-flight loads.

`ModelCache` holds loaded models keyed by `model_id@version`. Its rules:

- Budget in bytes. A model's size is what `Servable.nbytes` reports after the load (measured
  on the device), not its file size. Before a load, room is made for a size hint (the
  manifest's declared file bytes), and the hint is *reserved* while the load runs, so concurrent
  loads cannot jointly overshoot. After the load the reservation is swapped for the measured
  size; resident bytes never exceed the budget.
- LRU eviction of idle models only: a model leased by an in-flight request is never freed.
  If the only way to fit is to evict leased models, the load waits (bounded by
  `load_timeout_s`) for leases to be returned.
- Loads of different models run concurrently (up to `max_concurrent_loads`); concurrent
  requests for one model share one load.
- A failed load is remembered for `failure_ttl_s` and re-raised at once, so a broken model
  does not cause a retry storm. Nothing from a failed load is kept.
- A model larger than the whole budget fails with ModelTooLarge (507).
- Pinned models are never evicted; pins are refused (PinRefused, 507) when the pinned bytes
  would exceed the budget, and the on-demand models share what the pins leave.
- `unload(key)` evicts at once if the model is idle, else as its last lease ends.
- Which idle model goes first is the eviction policy's call (serve_app/cache/policy.py; LRU by
  default); whether it may go (not leased, not pinned) is the cache's.
- Extra copies of hot models (`mark_copy`) are evicted before any other model, and
  `evict_idle_copies` drops those the router stopped using (the model cooled).
- Callbacks (`on_change`, `on_event`) that raise are logged and never break the accounting.

The cache knows nothing of Ray, S3 or torch: loads are injected callables, which keeps it
testable with fakes and `asyncio.Event` gates.

Size: over the module limit on purpose. `ModelCache` is one class guarding one set of
invariants (resident plus reserved bytes within the budget, a leased or pinned model never
freed, one load per key, failures remembered) on one event loop; every method reads and
updates the same counters, so splitting the class would scatter those rules. Moving out the
dataclasses and helpers around it (about 110 lines) would only take the module to the edge of
the limit, and put the entry type the class manages in a different file from its rules.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Generic, Protocol, TypeVar

from serve_app.cache.policy import EvictionPolicy, LRUPolicy
from serve_app.errors import (
    FleetError,
    LoadTimeout,
    ModelLoadFailed,
    ModelTooLarge,
    NoRoom,
    PinRefused,
)

logger = logging.getLogger(__name__)


class Servable(Protocol):
    """What the cache needs of a loaded model: its measured size and a way to free it."""

    @property
    def nbytes(self) -> int:
        """Bytes the model occupies on its device, measured after load."""
        ...

    def close(self) -> None:
        """Free the model's memory (device memory included)."""
        ...


M = TypeVar("M", bound=Servable)
T = TypeVar("T")
LoadFn = Callable[[], Awaitable[M]]


@dataclass
class CacheEntry(Generic[M]):
    """A resident model and its bookkeeping."""

    key: str
    model: M
    nbytes: int
    load_seconds: float
    loaded_at: float
    last_used: float
    leases: int = 0
    hits: int = 0
    pinned: bool = False
    copy: bool = False  # an extra copy of a hot model (serve_app/gateway/hot_copies.py)


@dataclass(frozen=True)
class Lease(Generic[M]):
    """A model handed to one request; the cache will not free it until the lease ends."""

    key: str
    model: M
    hit: bool
    wait_seconds: float


@dataclass
class CacheEvent:
    """What happened in the cache (for metrics and logs)."""

    kind: str  # "hit" | "miss" | "load" | "load_failed" | "evict"
    key: str
    nbytes: int = 0
    seconds: float = 0.0
    reason: str = ""


@dataclass
class CacheStats:
    """Counters since the cache was created."""

    hits: int = 0
    misses: int = 0
    loads: int = 0
    load_failures: int = 0
    evictions: int = 0
    failure_memory_hits: int = 0
    load_timeouts: int = 0
    peak_resident_bytes: int = 0
    evicted_keys: list[str] = field(default_factory=list)


@dataclass
class _Failure:
    error: FleetError
    expires_at: float


class ModelCache(Generic[M]):
    """Byte-budgeted LRU cache of loaded models for one replica (see module docstring)."""

    def __init__(
        self,
        budget_bytes: int,
        *,
        max_concurrent_loads: int = 2,
        failure_ttl_s: float = 10.0,
        load_timeout_s: float = 300.0,
        on_change: Callable[[], None] | None = None,
        on_event: Callable[[CacheEvent], None] | None = None,
        policy: EvictionPolicy | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if budget_bytes <= 0:
            raise ValueError("budget_bytes must be positive")
        self.budget_bytes = budget_bytes
        self.failure_ttl_s = failure_ttl_s
        self.load_timeout_s = load_timeout_s
        self.stats = CacheStats()
        self._entries: OrderedDict[str, CacheEntry[M]] = OrderedDict()
        self._loading: dict[str, asyncio.Task[CacheEntry[M]]] = {}
        self._waiters: dict[str, int] = {}
        self._failures: dict[str, _Failure] = {}
        self._room_waits: set[str] = set()  # loads waiting for room (their timeout: NoRoom)
        self._reserved = 0
        # NOTE: unloaded while leased: out of the cache (a new request loads a fresh copy),
        # still counted as resident until the last in-flight request lets go.
        self._draining: dict[str, CacheEntry[M]] = {}
        self._pins: dict[str, int] = {}  # key -> size hint (used until the model is resident)
        self.policy: EvictionPolicy = policy if policy is not None else LRUPolicy()
        self._resident = 0  # NOTE: kept as a running sum: cheap, and safe to read from threads
        self._load_slots = asyncio.Semaphore(max_concurrent_loads)
        # NOTE: loads from local copies have slots of their own: a stalled store holding
        # every slot must not stall a version the disk tier already has.
        self._local_slots = asyncio.Semaphore(max_concurrent_loads)
        # NOTE: replaced on every signal; waiters hold the one that was current when they
        # found no room, so a signal between their check and their wait is never lost.
        self._room_freed = asyncio.Event()
        self._on_change = on_change
        self._on_event = on_event
        self._clock = clock

    # ------------------------------------------------------------------ views
    @property
    def resident_bytes(self) -> int:
        """Measured bytes of all resident models."""
        return self._resident

    @property
    def resident_count(self) -> int:
        """Number of resident models."""
        return len(self._entries)

    @property
    def reserved_bytes(self) -> int:
        """Bytes set aside for loads in progress."""
        return self._reserved

    def resident_keys(self) -> list[str]:
        """Keys of resident models, least recently used first."""
        return list(self._entries)

    def loading_keys(self) -> list[str]:
        """Keys of loads in progress."""
        return list(self._loading)

    def routing_keys(self) -> list[str]:
        """What this replica should advertise to the router: resident plus loading."""
        return [*self._entries, *(k for k in self._loading if k not in self._entries)]

    def entries(self) -> list[CacheEntry[M]]:
        """Resident entries, least recently used first."""
        return list(self._entries.values())

    def is_pinned(self, key: str) -> bool:
        """Whether `key` is pinned (resident or not)."""
        return key in self._pins

    def pinned_keys(self) -> list[str]:
        """Pinned keys, in the order they were pinned."""
        return list(self._pins)

    @property
    def pinned_bytes(self) -> int:
        """Bytes the pins hold: measured for resident pins, the size hint otherwise."""
        return sum(self._pin_size(key) for key in self._pins)

    def _pin_size(self, key: str) -> int:
        entry = self._entries.get(key)
        return entry.nbytes if entry is not None else self._pins.get(key, 0)

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    # ------------------------------------------------------------------ leases
    @contextlib.asynccontextmanager
    async def lease(self, key: str, load: LoadFn[M], size_hint: int = 0) -> AsyncIterator[Lease[M]]:
        """Get model `key`, loading it with `load()` on a miss; hold it for the block.

        Args:
            key: cache key (`model_id@version`).
            load: coroutine function that loads the model; only the first concurrent
                caller's `load` runs, the others share its result.
            size_hint: expected resident bytes, used to make room before loading.

        Raises:
            FleetError: the typed reason the model could not be made resident.
        """
        lease = await self.acquire(key, load, size_hint)
        try:
            yield lease
        finally:
            self.release(key, lease.model)

    async def acquire(
        self, key: str, load: LoadFn[M], size_hint: int = 0, local: bool = False
    ) -> Lease[M]:
        """Like `lease()`, but the caller must call `release(key)` when done.

        `local`: the load reads only local copies (disk or RAM tier), so it takes one of its
        own `max_concurrent_loads` slots and never queues behind loads waiting on the store.
        """
        start = self._clock()
        entry = self._entries.get(key)
        if entry is not None:
            self._touch(entry)
            entry.leases += 1
            entry.hits += 1
            self.stats.hits += 1
            self.policy.on_hit(entry)
            self._emit(CacheEvent("hit", key, entry.nbytes))
            return Lease(key, entry.model, hit=True, wait_seconds=0.0)

        failure = self._failures.get(key)
        if failure is not None:
            if failure.expires_at > self._clock():
                self.stats.failure_memory_hits += 1
                raise _copy_error(failure.error, failure.expires_at - self._clock())
            del self._failures[key]

        self.stats.misses += 1
        self._emit(CacheEvent("miss", key))
        task = self._loading.get(key)
        if task is None:
            task = asyncio.create_task(self._load(key, load, size_hint, local), name=f"load:{key}")
            # NOTE: retrieve the outcome even when every waiter has gone away.
            task.add_done_callback(_retrieve)
            self._loading[key] = task
            self._changed()
        self._waiters[key] = self._waiters.get(key, 0) + 1
        try:
            # NOTE: shield: a caller that gives up must not cancel a load others share. The
            # wait is bounded by load_timeout_s whatever the load waits on (a stalled store,
            # a slow disk); the load itself goes on, and a later request finds it resident.
            entry = await asyncio.wait_for(asyncio.shield(task), self.load_timeout_s)
        except (asyncio.CancelledError, TimeoutError) as exc:
            if task.done() and not task.cancelled() and task.exception() is None:
                self.release(key, task.result().model)  # the lease was granted at admission
            elif not task.done():
                self._waiters[key] -= 1
            if isinstance(exc, TimeoutError):
                self.stats.load_timeouts += 1
                if key in self._room_waits:
                    raise _no_room(key, self.load_timeout_s) from None
                raise LoadTimeout(
                    f"{key} did not load within {self.load_timeout_s:g}s "
                    "(host.load_timeout_s); it goes on loading, retry later",
                    retry_after_s=5.0,
                ) from None
            raise
        return Lease(key, entry.model, hit=False, wait_seconds=self._clock() - start)

    def release(self, key: str, model: M | None = None) -> None:
        """End one lease on `key` (on `model`, when given); wakes loads waiting for room."""
        draining = self._draining.get(key)
        if draining is not None and (model is None or draining.model is model):
            draining.leases -= 1
            if draining.leases == 0:
                del self._draining[key]
                self._free(draining, reason="unload")
                self._signal_room()
            return
        entry = self._entries.get(key)
        if entry is None:
            return
        entry.leases -= 1
        entry.last_used = self._clock()
        if entry.leases == 0:
            self._signal_room()

    async def call_in_thread(self, lease: Lease[M], fn: Callable[[M], T]) -> T:
        """Run `fn(lease.model)` in a worker thread, then end the lease.

        The lease ends when the *thread* ends, not when the caller stops waiting: a
        cancelled request (client gone) cannot let the model be evicted and closed while
        its thread still uses it.
        """
        work = asyncio.ensure_future(asyncio.to_thread(fn, lease.model))
        try:
            return await asyncio.shield(work)
        finally:
            if work.done():
                self.release(lease.key, lease.model)
            else:
                work.add_done_callback(lambda _: self.release(lease.key, lease.model))
                work.add_done_callback(_retrieve)

    # ------------------------------------------------------------------ loading
    async def _load(
        self, key: str, load: LoadFn[M], size_hint: int, local: bool = False
    ) -> CacheEntry[M]:
        reserved = 0
        try:
            self._check_fits(key, size_hint, measured=False)
            async with self._local_slots if local else self._load_slots:
                await self._make_room(size_hint, key)
                self._reserved += size_hint
                reserved = size_hint
                started = self._clock()
                model = await load()
                load_seconds = self._clock() - started
            nbytes = int(model.nbytes)
            self._reserved -= reserved
            reserved = 0
            try:
                self._check_fits(key, nbytes, measured=True)
            except ModelTooLarge:
                _close_quietly(key, model)
                raise
            try:
                await self._make_room(nbytes, key)
            except BaseException:
                _close_quietly(key, model)
                raise
            now = self._clock()
            entry = CacheEntry(key, model, nbytes, load_seconds, now, now)
            entry.leases = self._waiters.pop(key, 0)
            entry.pinned = key in self._pins
            self._entries[key] = entry
            self._resident += nbytes
            self.policy.on_load(entry)
            self.stats.loads += 1
            self.stats.peak_resident_bytes = max(
                self.stats.peak_resident_bytes, self.resident_bytes
            )
            self._emit(CacheEvent("load", key, nbytes, load_seconds))
            logger.info(
                "model loaded",
                extra={"key": key, "bytes": nbytes, "load_s": round(load_seconds, 3)},
            )
            return entry
        except FleetError as exc:
            self._fail(key, exc)
            raise
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            # NOTE: an unexpected loader error is a server fault; keep its type in the log.
            logger.exception("model load failed", extra={"key": key})
            error = ModelLoadFailed(f"loading {key} failed: {type(exc).__name__}")
            self._fail(key, error)
            raise error from exc
        finally:
            self._reserved -= reserved
            self._loading.pop(key, None)
            self._changed()
            self._signal_room()

    def _fail(self, key: str, error: FleetError) -> None:
        self._waiters.pop(key, None)
        self.stats.load_failures += 1
        self._emit(CacheEvent("load_failed", key, reason=error.code))
        if error.remember and self.failure_ttl_s > 0:
            self._failures[key] = _Failure(error, self._clock() + self.failure_ttl_s)

    def _check_fits(self, key: str, nbytes: int, measured: bool) -> None:
        """Raise ModelTooLarge if `key` can never fit beside the other pinned models."""
        pinned_others = sum(self._pin_size(k) for k in self._pins if k != key)
        if nbytes + pinned_others > self.budget_bytes:
            raise ModelTooLarge(
                _too_large_message(key, nbytes, self.budget_bytes, measured, pinned_others)
            )

    def _evictable(self) -> Iterator[CacheEntry[M]]:
        victims = (e for e in self.policy.victims(self._entries.values()) if _evictable(e))
        if not any(e.copy for e in self._entries.values()):
            return victims
        # NOTE: extra copies of hot models go first (stable: policy order within each).
        return iter(sorted(victims, key=lambda e: not e.copy))

    async def _make_room(self, nbytes: int, key: str) -> None:
        """Evict idle models (policy order) until `nbytes` more fit; wait for leases if needed."""
        deadline = self._clock() + self.load_timeout_s
        while self.resident_bytes + self._reserved + nbytes > self.budget_bytes:
            victim = next(self._evictable(), None)
            if victim is not None:
                self._evict(victim, reason="capacity")
                continue
            remaining = deadline - self._clock()
            if remaining <= 0:
                raise _no_room(key, self.load_timeout_s)
            self._room_waits.add(key)
            try:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._room_freed.wait(), timeout=remaining)
            finally:
                self._room_waits.discard(key)

    def _evict(self, entry: CacheEntry[M], reason: str) -> None:
        del self._entries[entry.key]
        self._free(entry, reason)

    def _free(self, entry: CacheEntry[M], reason: str) -> None:
        self._resident -= entry.nbytes
        self.stats.evictions += 1
        self.stats.evicted_keys.append(entry.key)
        del self.stats.evicted_keys[:-1000]
        self.policy.on_evict(entry)
        _close_quietly(entry.key, entry.model)
        self._emit(CacheEvent("evict", entry.key, entry.nbytes, reason=reason))
        logger.info("model evicted", extra={"key": entry.key, "bytes": entry.nbytes})
        self._changed()

    def _signal_room(self) -> None:
        self._room_freed.set()
        self._room_freed = asyncio.Event()

    # ------------------------------------------------------------------ admin
    async def evict(self, key: str, reason: str = "manual") -> bool:
        """Evict `key` now if it is resident, idle and not pinned; return whether it was."""
        entry = self._entries.get(key)
        if entry is None or not _evictable(entry):
            return False
        self._evict(entry, reason)
        self._signal_room()
        return True

    def mark_copy(self, key: str) -> None:
        """`key` was loaded as an extra copy of a hot model: it goes before any other
        model when room is needed, and `evict_idle_copies` drops it once it idles."""
        entry = self._entries.get(key)
        if entry is not None and not entry.pinned:
            entry.copy = True

    def copy_keys(self) -> list[str]:
        """Keys resident as extra copies of hot models."""
        return [e.key for e in self._entries.values() if e.copy]

    def evict_idle_copies(self, idle_s: float) -> list[str]:
        """Evict the extra copies that served nothing for `idle_s` (the model cooled and the
        router stopped sending it here); returns their keys."""
        now = self._clock()
        cooled = [
            e
            for e in self._entries.values()
            if e.copy and _evictable(e) and now - e.last_used >= idle_s
        ]
        for entry in cooled:
            self._evict(entry, reason="cooled")
        if cooled:
            self._signal_room()
        return [e.key for e in cooled]

    def unload(self, key: str) -> bool:
        """Unpin `key` and evict it: now if idle, else when its last lease ends.

        Returns whether it was resident (so it is, or will be, evicted). In-flight requests
        keep their model until they finish; a new request loads a fresh copy.
        """
        self.unpin(key)
        entry = self._entries.get(key)
        if entry is None:
            return False
        if entry.leases == 0:
            self._evict(entry, reason="unload")
            self._signal_room()
        elif key in self._draining:
            return False  # an older copy is still draining; this one stays for now
        else:
            del self._entries[key]
            self._draining[key] = entry
            self._changed()
        return True

    def pin(self, key: str, size_hint: int) -> None:
        """Never evict `key` (see the module docstring); does not load it.

        Raises:
            PinRefused: the pinned bytes, this model included, would exceed the budget.
        """
        if key in self._pins:
            return
        entry = self._entries.get(key)
        size = entry.nbytes if entry is not None else size_hint
        if self.pinned_bytes + size > self.budget_bytes:
            raise PinRefused(
                f"pinning {key} ({size / 2**20:.1f} MiB) would put the pinned models at "
                f"{(self.pinned_bytes + size) / 2**20:.1f} MiB, over this replica's memory "
                f"budget of {self.budget_bytes / 2**20:.1f} MiB; unpin another model or "
                "raise the budget"
            )
        self._pins[key] = size
        if entry is not None:
            entry.pinned = True
            entry.copy = False  # a pinned model is nobody's extra copy
        self._changed()

    def unpin(self, key: str) -> bool:
        """Make `key` evictable again; returns whether it was pinned."""
        if self._pins.pop(key, None) is None:
            return False
        entry = self._entries.get(key)
        if entry is not None:
            entry.pinned = False
        self._changed()
        self._signal_room()
        return True

    async def close(self) -> None:
        """Free every idle model, pinned ones too (replica shutdown)."""
        for entry in list(self._entries.values()):
            if entry.leases == 0:
                self._evict(entry, reason="shutdown")

    # ------------------------------------------------------------------ helpers
    def _touch(self, entry: CacheEntry[M]) -> None:
        entry.last_used = self._clock()
        self._entries.move_to_end(entry.key)

    def _changed(self) -> None:
        if self._on_change is not None:
            # NOTE: a failing observer must never leave a lease, reservation or entry behind.
            try:
                self._on_change()
            except Exception:
                logger.exception("cache on_change callback failed")

    def _emit(self, event: CacheEvent) -> None:
        if self._on_event is not None:
            try:
                self._on_event(event)
            except Exception:
                logger.exception("cache on_event callback failed", extra={"event": event.kind})


def _evictable(entry: CacheEntry[M]) -> bool:
    return entry.leases == 0 and not entry.pinned


def _too_large_message(
    key: str, nbytes: int, budget: int, measured: bool, pinned_bytes: int = 0
) -> str:
    how = "measured" if measured else "expected"
    if pinned_bytes:
        return (
            f"model {key} needs {nbytes / 2**20:.1f} MiB ({how}), more than the "
            f"{(budget - pinned_bytes) / 2**20:.1f} MiB that this replica's pinned models "
            f"leave of its {budget / 2**20:.1f} MiB budget; unpin a model or raise "
            "host.memory_budget"
        )
    return (
        f"model {key} needs {nbytes / 2**20:.1f} MiB ({how}), more than this replica's "
        f"whole memory budget of {budget / 2**20:.1f} MiB; raise host.memory_budget "
        "or serve it from a pool with more memory"
    )


def _copy_error(error: FleetError, retry_after_s: float) -> FleetError:
    """A fresh instance of a remembered error (no shared traceback between requests)."""
    retry = error.retry_after_s
    if retry is not None:
        retry = max(retry_after_s, 0.0)
    return type(error)(error.message, retry)


def _no_room(key: str, timeout_s: float) -> NoRoom:
    return NoRoom(
        f"no room for {key} within {timeout_s:.0f}s: every resident model is pinned or in "
        "use by a request",
        retry_after_s=1.0,
    )


def _retrieve(task: asyncio.Task[object]) -> None:
    if not task.cancelled():
        task.exception()


def _close_quietly(key: str, model: Servable) -> None:
    try:
        model.close()
    except Exception:
        logger.exception("closing model failed", extra={"key": key})
