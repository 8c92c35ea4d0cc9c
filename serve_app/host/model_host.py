"""The model host: one replica's cache + loader, answering `PredictCall`s.

`ModelHost` is what a model-host Serve replica delegates to. It owns the replica's
`ModelCache` (byte budget, LRU, leases), runs loads and inference in worker threads so the
event loop keeps serving, and reports the set of resident (and loading) models through the
`on_routing_change` callback so the router's view matches what the replica really holds.

Threads: loads (fetch, verify, deserialise, build) run on a pool of `max_concurrent_loads`
threads and predictions on their own pool of `predict_threads`, so a warm request never
queues behind a load. Concurrent requests for one model are batched (`serve_app.host.batching`):
one forward pass per batch, one batch per model at a time, batches never mix models.
It also executes management commands (`apply`: load, unload, pin, unpin) and applies the
pin store's desired state (`reconcile_pins`).
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

from serve_app.cache.model_cache import CacheEvent, Lease, ModelCache
from serve_app.cache.policy import make_policy
from serve_app.config import DEFAULT_POOL, HostConfig
from serve_app.errors import CommandMisrouted, FleetError, PinnedByConfig, unwrap
from serve_app.host.batching import BatchPolicy, MicroBatcher
from serve_app.host.groups import predict_requests
from serve_app.host.predictor import Predictor
from serve_app.loading.loader import ModelLoader, memory_budget, resolve_device
from serve_app.management.pins import PinRecord
from serve_app.observability.metrics import HostMetrics
from serve_app.schemas import (
    BatchResult,
    HostCommand,
    HostReply,
    PredictBatch,
    PredictCall,
    PredictResponse,
)
from serve_app.storage.manifest import Manifest
from serve_app.storage.store import ModelStore

logger = logging.getLogger(__name__)

# NOTE: a load thread deserialising a model holds the GIL for long stretches; with the
# default 5 ms switch interval every warm request on the event loop waits behind it. 1 ms
# hands the GIL back five times as often, and load threads (and the fetch threads they
# start, which inherit it) run at a lower OS priority, so warm requests keep flowing.
GIL_SWITCH_INTERVAL_S = 0.001
# NOTE: the priority is lowered *relative* to the thread that starts the pool. Ray runs
# its worker processes (every Serve replica) at nice 15 (`RAY_worker_niceness`); an absolute
# nice 10 would have given the loads three times the CPU weight of the serving threads.
LOAD_THREAD_NICE_STEP = 10
MAX_NICE = 19


def load_thread_nice(current: int) -> int:
    """The nice value for a load thread started by a thread at `current`."""
    return min(MAX_NICE, current + LOAD_THREAD_NICE_STEP)


def _lower_priority() -> None:
    """ThreadPoolExecutor initializer: run this thread below the thread that started it
    (a new thread inherits its creator's nice value)."""
    tid = threading.get_native_id()
    try:
        os.setpriority(os.PRIO_PROCESS, tid, load_thread_nice(os.getpriority(os.PRIO_PROCESS, tid)))
    except (AttributeError, OSError) as exc:  # not Linux, or not permitted
        logger.debug("could not lower the load thread's priority", extra={"error": str(exc)})


class ModelHost:
    """Serves predictions from a byte-budgeted cache of models loaded from the store."""

    def __init__(
        self,
        config: HostConfig,
        store: ModelStore,
        *,
        replica: str = "local",
        pool: str = DEFAULT_POOL,
        on_routing_change: Callable[[list[str]], None] | None = None,
        metrics: HostMetrics | None = None,
    ) -> None:
        torch.set_num_threads(config.torch_threads)
        sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)
        self.config = config
        self.replica = replica
        self.pool = pool
        # NOTE: pins this host took from the pin store (or a pin command), as opposed to
        # pins someone else set on the cache; only these are released by reconcile_pins().
        self._store_pins: set[str] = set()
        # NOTE: pins from the config's routing (`set_pins`); each path releases only its own.
        self._config_pins: set[str] = set()
        self._pin_errors: dict[str, str] = {}
        self.device = resolve_device(config.accelerator)
        self.loader = ModelLoader.from_config(store, config, self.device)
        self._on_routing_change = on_routing_change
        self.metrics = metrics
        self._load_pool = ThreadPoolExecutor(
            config.max_concurrent_loads, "fleet-load", initializer=_lower_priority
        )
        self._local_load_pool = ThreadPoolExecutor(
            config.max_concurrent_loads, "fleet-load-local", initializer=_lower_priority
        )
        self.predict_pool = ThreadPoolExecutor(config.predict_threads, "fleet-predict")
        self.batcher: MicroBatcher[tuple[str, Predictor], list[Any], list[Any]] = MicroBatcher(
            self._run_batch, self._batch_policy
        )
        self.pin_errors: dict[str, str] = {}
        self.grouped_calls = 0  # calls that carried several models (ReplicaBatch)
        self.cache: ModelCache[Predictor] = ModelCache(
            memory_budget(config, self.device),
            max_concurrent_loads=config.max_concurrent_loads,
            failure_ttl_s=config.failure_ttl_s,
            load_timeout_s=config.load_timeout_s,
            on_change=self._routing_changed,
            on_event=self._cache_event,
            policy=make_policy(config.eviction_policy),
        )
        logger.info(
            "model host ready",
            extra={
                "replica": replica,
                "device": str(self.device),
                "budget_bytes": self.cache.budget_bytes,
                "eviction_policy": self.cache.policy.name,
            },
        )

    def refresh_gauges(self) -> None:
        """Set the per-replica gauges (thread-safe; Ray drops gauges not set for ~20 s,
        so the deployment calls this on a heartbeat as well as on every change)."""
        if self.metrics is not None:
            self.metrics.set_residency(
                self.cache.resident_bytes, self.cache.budget_bytes, self.cache.resident_count
            )

    def _routing_changed(self) -> None:
        self.refresh_gauges()
        if self._on_routing_change is not None:
            self._on_routing_change(self.cache.routing_keys())

    def _cache_event(self, event: CacheEvent) -> None:
        if self.metrics is not None:
            self.metrics.on_event(event, time.monotonic())

    def _loader_for(
        self, manifest: Manifest, local: bool = False
    ) -> Callable[[], Awaitable[Predictor]]:
        pool = self._local_load_pool if local else self._load_pool

        async def load() -> Predictor:
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(
                pool, self.loader.load, manifest, self.cache.budget_bytes
            )

        return load

    async def acquire(self, manifest: Manifest) -> Lease[Predictor]:
        """Lease `manifest`'s model, loading it on a miss: a version the RAM or disk tier
        holds loads on threads and cache slots of its own, so it never waits behind loads
        stuck on the store (a stalled S3 holds those until `store.stall_timeout_s`)."""
        # NOTE: a resident model needs no look at the RAM and disk tiers (file stats).
        local = manifest.key not in self.cache and self.loader.has_local_copy(manifest)
        return await self.cache.acquire(
            manifest.key,
            self._loader_for(manifest, local),
            size_hint=manifest.total_bytes,
            local=local,
        )

    async def set_pins(self, manifests: list[Manifest]) -> dict[str, str]:
        """Keep exactly `manifests` pinned here; returns the errors by key (empty if none).

        Pins no longer wanted are unpinned, not unloaded: they stay resident as ordinary
        LRU entries until room is needed. New pins are pinned first (so they count against
        the budget at once), then loaded concurrently. A pin that does not fit is refused
        (PinRefused) and reported; the others still apply.
        """
        wanted = {m.key: m for m in manifests}
        # NOTE: only config pins are released here; pins from the management API (the pin
        # store, `reconcile_pins`) are that path's to release.
        for key in self._config_pins - wanted.keys():
            if key not in self._store_pins:
                self.cache.unpin(key)
        self._config_pins = set(wanted)
        errors: dict[str, str] = {}
        loads = []
        for key, manifest in wanted.items():
            try:
                self.cache.pin(key, manifest.total_bytes)
            except FleetError as exc:
                errors[key] = str(exc)
                continue
            if key not in self.cache:
                loads.append(manifest)

        async def load_pin(manifest: Manifest) -> None:
            lease = await self.cache.acquire(
                manifest.key, self._loader_for(manifest), size_hint=manifest.total_bytes
            )
            self.cache.release(lease.key, lease.model)

        results = await asyncio.gather(*(load_pin(m) for m in loads), return_exceptions=True)
        for manifest, result in zip(loads, results, strict=True):
            if isinstance(result, BaseException):
                errors[manifest.key] = str(unwrap(result))
        self.pin_errors = errors
        if errors:
            logger.error("pins not applied", extra={"errors": errors})
        logger.info("pins applied", extra={"pins": sorted(wanted), "loaded": len(loads)})
        return errors

    async def predict(self, call: PredictCall) -> PredictResponse:
        """Predict with `call.manifest`'s model, loading it first if it is not resident."""
        batch = PredictBatch(call.manifest, [call.inputs], [call.request_id])
        return (await self.predict_batch(batch)).response(call.manifest, 0)

    async def predict_batch(self, batch: PredictBatch) -> BatchResult:
        """Predict every request of `batch` (one model version), loading it on a miss.

        The model stays leased until every prediction's thread is done. Each request's
        rows join the model's dynamic batches; a request's own failure is returned in its
        slot (typed), a load failure is raised for all."""
        manifest = batch.manifest
        # NOTE: every file is in memory during a load, so all of them count against the
        # budget (a manifest's declared sizes are untrusted; see ModelStore.check_sizes).
        lease = await self.acquire(manifest)
        key = (manifest.key, lease.model)
        work = asyncio.gather(
            *(self._predict_rows(key, rows) for rows in batch.inputs), return_exceptions=True
        )
        try:
            results = await asyncio.shield(work)
        finally:
            # NOTE: the lease ends when the predictions end, not when the caller stops
            # waiting: a cancelled request cannot let the model be closed under its thread.
            if work.done():
                self.cache.release(lease.key, lease.model)
            else:
                work.add_done_callback(lambda _: self.cache.release(lease.key, lease.model))
        if not lease.hit and self.metrics is not None:
            self.metrics.observe_wait(
                manifest.model_id, manifest.version, lease.wait_seconds * 1000
            )
        return BatchResult(
            outputs=list(results),
            resident=lease.hit,
            load_wait_ms=round(lease.wait_seconds * 1000, 3),
            replica=self.replica,
        )

    async def _predict_rows(self, key: tuple[str, Predictor], rows: list[Any]) -> list[Any]:
        policy = self._batch_policy(key)
        if policy.max_batch_size <= 1:  # batching off: every request is its own forward pass
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(self.predict_pool, key[1].predict, rows)
        return await self.batcher.submit(key, rows, rows=len(rows))

    def _batch_policy(self, key: tuple[str, Predictor]) -> BatchPolicy:
        config = self.config.batching.for_model(key[1].manifest.model_id)
        return BatchPolicy(config.max_batch_size, config.max_wait_ms, max_in_flight=1)

    async def _run_batch(
        self, key: tuple[str, Predictor], requests: list[list[Any]]
    ) -> list[list[Any]]:
        """One forward pass over the rows of several requests for one model."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.predict_pool, predict_requests, key[1], requests)

    def status(self) -> dict[str, Any]:
        """What this replica holds: budget, resident bytes, models and counters."""
        stats = self.cache.stats
        return {
            "replica": self.replica,
            "device": str(self.device),
            "pool": self.pool,
            "budget_bytes": self.cache.budget_bytes,
            "pinned": self.cache.pinned_keys(),
            "pinned_bytes": self.cache.pinned_bytes,
            "pin_errors": self.pin_errors,
            "eviction_policy": self.cache.policy.name,
            "resident_bytes": self.cache.resident_bytes,
            "reserved_bytes": self.cache.reserved_bytes,
            "peak_resident_bytes": stats.peak_resident_bytes,
            "models": [
                {
                    "key": e.key,
                    "bytes": e.nbytes,
                    "leases": e.leases,
                    "hits": e.hits,
                    "load_s": round(e.load_seconds, 4),
                    "pinned": e.pinned,
                    "copy": e.copy,
                    "loaded_at": round(_wall(e.loaded_at), 3),
                    "last_used": round(_wall(e.last_used), 3),
                }
                for e in self.cache.entries()
            ],
            "loading": self.cache.loading_keys(),
            "copies": self.cache.copy_keys(),
            "hits": stats.hits,
            "misses": stats.misses,
            "loads": stats.loads,
            "load_failures": stats.load_failures,
            "evictions": stats.evictions,
            "evicted": list(stats.evicted_keys[-100:]),
            "batches": self.batcher.stats.batches,
            "batched_requests": self.batcher.stats.items,
            "largest_batch": self.batcher.stats.largest_batch,
            "grouped_calls": self.grouped_calls,
            "ram_tier": self.loader.ram.status() if self.loader.ram is not None else None,
        }

    # ------------------------------------------------------------------ management
    async def prewarm(self, manifest: Manifest) -> None:
        """Make `manifest`'s model resident (a load without a request)."""
        lease = await self.acquire(manifest)
        self.cache.release(lease.key, lease.model)

    async def pin(self, manifest: Manifest) -> None:
        """Pin `manifest`'s model and load it; a failed load leaves it unpinned.

        Raises:
            PinRefused: the pinned models would not fit in the budget (507).
            FleetError: the load failed.
        """
        key = manifest.key
        was_pinned = self.cache.is_pinned(key)
        self.cache.pin(key, manifest.total_bytes)
        try:
            await self.prewarm(manifest)
        except BaseException:
            if not was_pinned:
                self.cache.unpin(key)
            raise
        self._store_pins.add(key)

    async def apply(self, command: HostCommand) -> HostReply:
        """Execute a management command addressed to this replica.

        Raises:
            CommandMisrouted: the command names another replica (the sender retries).
            FleetError: the typed reason a load or pin failed.
        """
        if command.replica != self.replica:
            raise CommandMisrouted(
                f"command for replica {command.replica} reached replica {self.replica}"
            )
        key = command.key
        before = (key in self.cache, self.cache.is_pinned(key))
        in_flight = next((e.leases for e in self.cache.entries() if e.key == key), 0)
        if command.op in ("load", "pin"):
            if command.manifest is None or command.manifest.key != key:
                raise CommandMisrouted(f"{command.op} of {key} came without its manifest")
            if command.op == "pin":
                await self.pin(command.manifest)
            else:
                await self.prewarm(command.manifest)
        else:
            # NOTE: pins have owners: the API releases its own pin, never the config's.
            self._store_pins.discard(key)
            if key in self._config_pins:
                raise PinnedByConfig(
                    f"{key} is pinned by the config (routing.pins) on replica {self.replica}; "
                    "it stays until the config drops it"
                )
            if command.op == "unpin":
                self.cache.unpin(key)
            else:
                self.cache.unload(key)
        return self._reply(key, before, in_flight)

    def _reply(self, key: str, before: tuple[bool, bool], in_flight: int) -> HostReply:
        entry = next((e for e in self.cache.entries() if e.key == key), None)
        after = (entry is not None, self.cache.is_pinned(key))
        return HostReply(
            replica=self.replica,
            key=key,
            changed=after != before,
            resident=after[0],
            pinned=after[1],
            pinned_before=before[1],
            bytes=entry.nbytes if entry is not None else 0,
            in_flight=in_flight,
        )

    async def reconcile_pins(self, records: list[PinRecord]) -> None:
        """Apply the pin store: pin and load what it lists, release what it dropped.

        Failures are logged and retried on the next call (a failed load is remembered by
        the cache for `failure_ttl_s`, so this does not hammer the store).
        """
        wanted = {r.key: r for r in records if r.pool == self.pool}
        for key in sorted(self._store_pins - wanted.keys()):
            self._store_pins.discard(key)
            if key not in self._config_pins:
                self.cache.unpin(key)
            logger.info("pin released", extra={"key": key, "replica": self.replica})
        for key, record in wanted.items():
            if key in self._store_pins and key in self.cache:
                continue
            try:
                await self.pin(record.manifest)
            except FleetError as exc:
                if self._pin_errors.get(key) == exc.code:
                    continue  # NOTE: logged once per cause, not on every heartbeat
                self._pin_errors[key] = exc.code
                logger.warning(
                    "pin not applied",
                    extra={
                        "key": key,
                        "replica": self.replica,
                        "code": exc.code,
                        "error": str(exc),
                    },
                )
            else:
                self._pin_errors.pop(key, None)
                logger.info("pin applied", extra={"key": key, "replica": self.replica})

    async def close(self) -> None:
        """Free every model and the private disk tier (replica shutdown)."""
        await self.batcher.close()
        await self.cache.close()
        self.loader.close()
        self.predict_pool.shutdown(wait=False, cancel_futures=True)
        self._load_pool.shutdown(wait=False, cancel_futures=True)
        self._local_load_pool.shutdown(wait=False, cancel_futures=True)


def _wall(monotonic_at: float) -> float:
    """A `time.monotonic()` reading as Unix time."""
    return time.time() - (time.monotonic() - monotonic_at)
