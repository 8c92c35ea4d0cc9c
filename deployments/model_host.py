"""Model-host deployment: one replica of a pool, over `serve_app.host.model_host.ModelHost`.

Each pool is one Serve deployment of this class (`ModelHost` for the default pool,
`ModelHost-<pool>` for others). Its config pins come from the routing board (see
`routing_board`): read and loaded before the replica reports ready, then polled every
`PIN_POLL_S`. Besides predictions it runs management commands addressed to it (`manage`,
delivered by `deployments.router.ModelAffinityRouter`) and applies the pin store of the
management API every `PIN_SYNC_S` seconds, starting at once, so a restarted replica gets
its pins back. Each path releases only the pins it took.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

import ray
from ray import serve
from ray.serve._private.common import RequestRoutingInfo
from ray.serve.context import _get_global_client

from deployments.replica_directory import GcsKeyValue, ReplicaPublisher
from deployments.routing_board import read_pins
from serve_app.config import PoolConfig, StoreConfig
from serve_app.host.coalescer import Coalescer
from serve_app.host.model_host import ModelHost
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
)
from serve_app.storage.store import ModelStore

logger = logging.getLogger(__name__)
PIN_POLL_S = 1.0
PIN_SYNC_S = 2.0
ADVERTISE_EVERY_S = 0.1  # as often as Ray's @serve.multiplexed pushes model ids


@serve.deployment(name="ModelHost")
class ModelHostDeployment:
    """Holds models in a byte-budgeted cache and tells the router which ones it holds."""

    async def __init__(self, config: PoolConfig, store_config: StoreConfig) -> None:
        configure_logging()
        context = serve.get_replica_context()
        self._app = context.app_name
        self._pool = config.name
        self._replica_id = context.replica_id
        replica = self._replica_id.unique_id
        self._advertiser: Coalescer[list[str]] = Coalescer(
            self._push_routing_info, ADVERTISE_EVERY_S, asyncio.get_running_loop()
        )
        self.host = ModelHost(
            config,
            ModelStore(store_config),
            replica=replica,
            pool=config.name,
            on_routing_change=self._advertise,
            metrics=HostMetrics(ModelLabels(config.max_model_labels), replica),
        )
        self._directory = ReplicaPublisher(
            context.app_name,
            "hosts",
            replica,
            on_heartbeat=self.host.refresh_gauges,
            actor_name=ray.get_runtime_context().get_actor_name(),
        )
        self._pins_seen: str | None = None
        await self._apply_pins()  # NOTE: pins are resident before the replica takes traffic
        self._directory.publish(self.host.status())
        self._published_at = time.monotonic()
        self._pin_poller = asyncio.get_running_loop().create_task(self._poll_pins())
        self._pins = PinStore(GcsKeyValue(), context.app_name)
        self._pin_sync = asyncio.get_running_loop().create_task(self._sync_pins_forever())

    async def _apply_pins(self) -> None:
        posted = await asyncio.to_thread(read_pins, self._app, self._pool)
        if posted is None or posted[0] == self._pins_seen:
            return
        self._pins_seen = posted[0]
        await self.host.set_pins(posted[1])
        self._directory.publish(self.host.status())

    async def _poll_pins(self) -> None:
        await asyncio.sleep(PIN_POLL_S)
        # NOTE: pins loaded in __init__ were reported before the controller knew this
        # replica; report them again now that it serves.
        self._advertise(self.host.cache.routing_keys())
        while True:
            await asyncio.sleep(PIN_POLL_S)
            try:
                await self._apply_pins()
            except Exception:  # NOTE: the poller must outlive a bad read; logged
                logger.exception("applying pins failed", extra={"pool": self._pool})
            # NOTE: request counters publish at most once a second from the request path;
            # this tick publishes the last ones once traffic stops.
            self._maybe_publish()

    async def _sync_pins_forever(self) -> None:
        while True:
            try:
                records = await asyncio.to_thread(self._pins.list)
                await self.host.reconcile_pins(records)
            except Exception:
                # NOTE: a GCS hiccup or a bad record must not end pin syncing for good.
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
        # NOTE: the same controller call Ray's @serve.multiplexed wrapper makes.
        _get_global_client().record_request_routing_info(
            RequestRoutingInfo(replica_id=self._replica_id, multiplexed_model_ids=keys)
        )
        if hasattr(self, "_directory"):
            self._directory.publish(self.host.status())

    async def predict(self, call: PredictCall) -> PredictResponse:
        """Predict with the model named by `call.manifest` (loads it on a miss)."""
        try:
            return await self.host.predict(call)
        finally:
            self._maybe_publish()

    async def predict_batch(self, batch: PredictBatch) -> BatchResult:
        """Predict several requests for one model version (the ingress's batches)."""
        try:
            return await self.host.predict_batch(batch)
        finally:
            self._maybe_publish()

    def _maybe_publish(self) -> None:
        # NOTE: residency changes publish at once (_advertise); counters at most 1/s.
        now = time.monotonic()
        if now - self._published_at >= 1.0:
            self._published_at = now
            self._directory.publish(self.host.status())

    async def manage(self, command: HostCommand) -> HostReply:
        """Run a management command (load, unload, pin, unpin) addressed to this replica."""
        reply = await self.host.apply(command)
        await asyncio.to_thread(self._directory.publish_now, self.host.status())
        return reply

    def status(self) -> dict[str, Any]:
        """Budget, resident bytes and models of this replica."""
        return self.host.status()

    async def __del__(self) -> None:
        for task in (self._pin_poller, self._pin_sync):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._directory.close()
        await self.host.close()
