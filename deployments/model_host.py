"""Model-host deployment: one replica of a pool, over `serve_app.host.model_host.ModelHost`.

Each pool is one Serve deployment of this class (`ModelHost` for the default pool,
`ModelHost-<pool>` for others).

Config pins come through Serve: the deployment's `user_config` is the routing (the same
one the Ingress gets; `build_app` sets it from `args.routing`, a `serve deploy` config under
`deployments:`), and `reconfigure()` applies the pins its rules place in this pool
(`serve_app.host.config_pins`: resolved from the store, since hosts have no registry). Serve
calls `reconfigure()` before the replica is ready, so pins are resident before it takes
traffic, on every (re)start, and again on a `serve deploy` that changes only user_config,
without restarting the replica. Pins without a version follow the latest one, and pins the
store could not resolve are retried, every `CONFIG_PIN_REFRESH_S`.

Besides predictions it runs management commands addressed to it (`manage`, delivered by
`deployments.router.ModelAffinityRouter`) and applies the management API's pin store (in the
model store, `serve_app.storage.state_store`) every `PIN_SYNC_S` seconds, starting at once,
so a restarted replica gets its pins back. Each path releases only the pins it took.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import ray
from ray import serve

from deployments.ray_internals import push_model_ids
from deployments.replica_directory import ReplicaPublisher, node_identity
from serve_app.config import PoolConfig, StoreConfig
from serve_app.host.coalescer import Coalescer
from serve_app.host.config_pins import ConfigPins
from serve_app.host.groups import predict_group
from serve_app.host.model_host import ModelHost
from serve_app.host.working_set import WorkingSet
from serve_app.management.pins import PinStore
from serve_app.observability.logs import configure_logging
from serve_app.observability.metrics import HostMetrics, ModelLabels
from serve_app.schemas import (
    BatchResult,
    HostCommand,
    HostReply,
    PredictBatch,
    PredictCall,
    PredictResponse,
    ReplicaBatch,
)
from serve_app.storage.manifest import Manifest
from serve_app.storage.state_store import AcceptedRouting, StoreKeyValue
from serve_app.storage.store import ModelStore

logger = logging.getLogger(__name__)
PIN_POLL_S = 1.0
PIN_SYNC_S = 2.0
CONFIG_PIN_REFRESH_S = 10.0  # one LIST per un-versioned (or unresolved) config pin
ADVERTISE_EVERY_S = 0.1  # as often as Ray's @serve.multiplexed pushes model ids


@serve.deployment(name="ModelHost")
class ModelHostDeployment:
    """Holds models in a byte-budgeted cache and tells the router which ones it holds."""

    async def __init__(
        self,
        config: PoolConfig,
        store_config: StoreConfig,
        pools: list[str] | None = None,
        store_pins: bool = True,
    ) -> None:
        """`pools`: every pool of the app in declared order (pins are placed among them).
        `store_pins`: apply the management API's stored pins (off with management off)."""
        configure_logging()
        context = serve.get_replica_context()
        self._app = context.app_name
        self._pool = config.name
        self._replica_id = context.replica_id
        self._push_thread = ThreadPoolExecutor(1, "model-ids")
        self._closing = False
        replica = self._replica_id.unique_id
        self._advertiser: Coalescer[list[str]] = Coalescer(
            self._push_routing_info, ADVERTISE_EVERY_S, asyncio.get_running_loop()
        )
        self._copies = config.hot_copies
        working_set = config.autoscale_on_working_set
        self._working_set = WorkingSet(working_set.window_s if working_set else 60.0)
        store = ModelStore(store_config)
        self.host = ModelHost(
            config,
            store,
            replica=replica,
            pool=config.name,
            on_routing_change=self._advertise,
            metrics=HostMetrics(
                ModelLabels(config.max_model_labels), replica, node=node_identity().get("node", "")
            ),
        )
        self._directory = ReplicaPublisher(
            context.app_name,
            "hosts",
            replica,
            on_heartbeat=self.host.refresh_gauges,
            actor_name=ray.get_runtime_context().get_actor_name(),
        )
        state = StoreKeyValue.of(store)
        self._accepted = AcceptedRouting(state, context.app_name)
        self._config_pins = ConfigPins(store, config.name, pools or [config.name])
        self._config_lock = asyncio.Lock()
        self._config_applied: list[str] | None = None  # keys last given to set_pins
        self._set_pin_errors: dict[str, str] = {}
        self._config_refresh_at = 0.0
        self._directory.publish(self.status())
        self._published_at = time.monotonic()
        self._readvertise_at: float | None = time.monotonic() + PIN_POLL_S
        self._pin_poller = asyncio.get_running_loop().create_task(self._poll_pins())
        self._pins = PinStore(state, context.app_name)
        self._pin_sync = (
            asyncio.get_running_loop().create_task(self._sync_pins_forever())
            if store_pins
            else None
        )

    async def reconfigure(self, user_config: dict[str, Any] | None) -> None:
        """Serve `user_config`: the routing, whose pins in this pool are made resident here
        before this returns. Never raises (Serve would stop the replica): a routing this
        pool cannot take is logged and leaves the pins as they were."""
        async with self._config_lock:
            first = self._config_applied is None
            try:
                manifests = await asyncio.to_thread(
                    self._config_pins.configure, user_config, self._read_accepted
                )
                if manifests is not None:
                    await self._apply_config_pins(manifests, force=True)
            except Exception:  # NOTE: logged; the poller retries what did not resolve
                logger.exception("applying config pins failed", extra={"pool": self._pool})
            self._config_refresh_at = time.monotonic() + CONFIG_PIN_REFRESH_S
        if first:
            # NOTE: pins loaded before the replica was ready were reported before the
            # controller knew it; report them again once it serves.
            self._readvertise_at = time.monotonic() + PIN_POLL_S

    def _read_accepted(self) -> dict[str, Any] | None:
        return self._accepted.read()

    async def _apply_config_pins(self, manifests: list[Manifest], force: bool = False) -> None:
        keys = sorted(m.key for m in manifests)
        if keys == self._config_applied and not force:
            self.host.pin_errors = {**self._config_pins.errors, **self._set_pin_errors}
            return
        self._set_pin_errors = await self.host.set_pins(manifests)
        self._config_applied = keys
        self.host.pin_errors = {**self._config_pins.errors, **self._set_pin_errors}
        self._directory.publish(self.status())

    async def _refresh_config_pins(self) -> None:
        """Follow the latest version of un-versioned pins, retry unresolved ones."""
        if time.monotonic() < self._config_refresh_at or not self._config_pins.needs_refresh:
            return
        async with self._config_lock:
            self._config_refresh_at = time.monotonic() + CONFIG_PIN_REFRESH_S
            manifests = await asyncio.to_thread(self._config_pins.refresh)
            await self._apply_config_pins(manifests)

    async def _poll_pins(self) -> None:
        while True:
            await asyncio.sleep(PIN_POLL_S)
            if self._readvertise_at is not None and time.monotonic() >= self._readvertise_at:
                self._readvertise_at = None
                self._advertise(self.host.cache.routing_keys())
            try:
                await self._refresh_config_pins()
            except Exception:  # NOTE: the poller must outlive a bad read; logged
                logger.exception("refreshing config pins failed", extra={"pool": self._pool})
            if self._copies.enabled:
                # NOTE: extra copies the router stopped using (the model cooled) go.
                self.host.cache.evict_idle_copies(self._copies.cool_after_s)
            # NOTE: request counters publish at most once a second from the request path;
            # this tick publishes the last ones once traffic stops.
            self._maybe_publish()

    async def _sync_pins_forever(self) -> None:
        while True:
            try:
                records = await asyncio.to_thread(self._pins.list)
                await self.host.reconcile_pins(records)
            except Exception:
                # NOTE: a store hiccup or a bad record must not end pin syncing for good.
                logger.exception("pin sync failed")
            await asyncio.sleep(PIN_SYNC_S)

    def _advertise(self, keys: list[str]) -> None:
        # NOTE: called on every residency change (load start, load end, eviction). The
        # first change after a quiet spell is pushed at once; a storm's changes are pushed
        # at most every ADVERTISE_EVERY_S, so the controller's rebroadcasts (and the work
        # they cause in every ingress replica, shared with the other pools) stay bounded.
        # The router marks a replica as holding a model the moment it accepts a request
        # for it, so a coalesced push does not cause duplicate loads.
        self._advertiser.submit(keys)

    def _push_routing_info(self, keys: list[str]) -> None:
        # NOTE: the same controller call Ray's @serve.multiplexed wrapper makes, made from
        # one thread of its own (pushes stay in order): the first one may look up Serve's
        # controller in the GCS, a blocking call that must not hold this event loop.
        # A replica shutting down advertises nothing more (its evictions would otherwise
        # reach a push thread that is already gone).
        if self._closing:
            return
        self._push_thread.submit(self._push_now, keys)
        if hasattr(self, "_directory"):
            self._directory.publish(self.status())

    def _push_now(self, keys: list[str]) -> None:
        try:
            push_model_ids(self._replica_id, keys)
        except Exception:  # NOTE: logged; the next residency change pushes again
            logger.exception("pushing model ids to Serve's controller failed")

    async def predict(self, call: PredictCall) -> PredictResponse:
        """Predict with the model named by `call.manifest` (loads it on a miss)."""
        try:
            return await self.host.predict(call)
        finally:
            self._maybe_publish()

    async def predict_batch(self, batch: PredictBatch) -> BatchResult:
        """Predict several requests for one model version (the ingress's batches); a batch
        the router sends while it makes an extra copy here (`copy_on`) marks the copy."""
        manifest = batch.manifest
        self._working_set.record(manifest.key, manifest.total_bytes)
        try:
            result = await self.host.predict_batch(batch)
            if batch.copy_on == self._replica_id.unique_id:
                self.host.cache.mark_copy(manifest.key)
            return result
        finally:
            self._maybe_publish()

    async def predict_many(self, group: ReplicaBatch) -> list[BatchResult | BaseException]:
        """Predict the batches of several models in one call (the ingress groups warm
        requests by the replica holding their models): one result, or that model's typed
        error, per batch (`serve_app.host.groups`: every model's forward passes in one job
        on the prediction threads)."""
        self.host.grouped_calls += len(group.batches) > 1
        for batch in group.batches:
            self._working_set.record(batch.manifest.key, batch.manifest.total_bytes)
        try:
            results = await predict_group(self.host, group)
        finally:
            self._maybe_publish()
        for batch, result in zip(group.batches, results, strict=True):
            if batch.copy_on == self._replica_id.unique_id and isinstance(result, BatchResult):
                self.host.cache.mark_copy(batch.manifest.key)
        return results

    def _maybe_publish(self) -> None:
        # NOTE: residency changes publish at once (_advertise); counters at most 1/s.
        now = time.monotonic()
        if now - self._published_at >= 1.0:
            self._published_at = now
            self._directory.publish(self.status())

    async def manage(self, command: HostCommand) -> HostReply:
        """Run a management command (load, unload, pin, unpin) addressed to this replica."""
        reply = await self.host.apply(command)
        await asyncio.to_thread(self._directory.publish_now, self.status())
        return reply

    def status(self) -> dict[str, Any]:
        """Budget, resident bytes and models of this replica, and the pins of the routing
        its `user_config` gave it (`routing_pins`, None before any), so the ingress can
        tell whether the hosts got the routing it serves (`GET /v1/routing`)."""
        config_pins = getattr(self, "_config_pins", None)  # NOTE: None early in __init__
        routing = None if config_pins is None else config_pins.routing
        return {**self.host.status(), "routing_pins": None if routing is None else routing.pins}

    async def record_routing_stats(self) -> dict[str, Any]:
        """Serve's routing-stats hook: this replica's memory budget and its use, for the
        router's placement of cold models (`serve_app.gateway.replica_ranking.rank_for_load`).

        Serve's controller calls it every `request_routing_stats_period_s` and rebroadcasts
        the replica set to every router when the answer changed, so it holds only what
        moves with residency (not the request counters, which change on every call).
        """
        cache = self.host.cache
        return {
            "budget_bytes": cache.budget_bytes,
            "resident_bytes": cache.resident_bytes,
            "reserved_bytes": cache.reserved_bytes,
            "copy_keys": cache.copy_keys(),  # extra copies of hot models (the router's)
        }

    async def record_autoscaling_stats(self) -> dict[str, float]:
        """Serve's custom autoscaling metrics hook: the bytes of the distinct models
        requested here in the working-set window, and the budget, for the pool's
        working-set policy (`deployments/autoscaling.py`; only with `autoscaling`)."""
        return {
            "working_set_bytes": float(self._working_set.bytes()),
            "budget_bytes": float(self.host.cache.budget_bytes),
        }

    async def __del__(self) -> None:
        self._closing = True
        for task in (self._pin_poller, self._pin_sync):
            if task is None:
                continue
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._directory.close()
        await self.host.close()
        self._push_thread.shutdown(wait=False)
