"""Model-host deployment: one replica of a pool, delegating to `serve_app.host.ModelHost`."""

from __future__ import annotations

import logging
import time
from typing import Any

from ray import serve
from ray.serve._private.common import RequestRoutingInfo
from ray.serve.context import _get_global_client

from deployments.replica_directory import ReplicaPublisher
from serve_app.config import HostConfig, StoreConfig
from serve_app.host import ModelHost
from serve_app.logs import configure_logging
from serve_app.metrics import HostMetrics, ModelLabels
from serve_app.schemas import BatchResult, PredictBatch, PredictCall, PredictResponse
from serve_app.store import ModelStore

logger = logging.getLogger(__name__)


@serve.deployment(name="ModelHost")
class ModelHostDeployment:
    """Holds models in a byte-budgeted cache and tells the router which ones it holds."""

    def __init__(self, config: HostConfig, store_config: StoreConfig) -> None:
        configure_logging()
        context = serve.get_replica_context()
        self._replica_id = context.replica_id
        replica = self._replica_id.unique_id
        self.host = ModelHost(
            config,
            ModelStore(store_config),
            replica=replica,
            on_routing_change=self._advertise,
            metrics=HostMetrics(ModelLabels(config.max_model_labels), replica),
        )
        self._directory = ReplicaPublisher(
            context.app_name, "hosts", replica, on_heartbeat=self.host.refresh_gauges
        )
        self._directory.publish(self.host.status())
        self._published_at = time.monotonic()

    def _advertise(self, keys: list[str]) -> None:
        # NOTE: the same controller call Ray's @serve.multiplexed wrapper makes; we push on
        # every change (load start, load end, eviction) so an evicted model stops
        # attracting traffic to this replica at once.
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

    def status(self) -> dict[str, Any]:
        """Budget, resident bytes and models of this replica."""
        return self.host.status()

    async def __del__(self) -> None:
        self._directory.close()
        await self.host.close()
