"""Ingress deployment: the FastAPI app and the handle API, over `serve_app.gateway.Gateway`.

HTTP routes come from `serve_app.http.create_app`; Ray jobs call the methods below through
`serve.get_app_handle("fleet")`.
"""

from __future__ import annotations

from typing import Any

import pyarrow as pa
from fastapi import FastAPI
from ray import serve
from ray.serve.handle import DeploymentHandle

from deployments.replica_directory import ReplicaPublisher, read_replicas
from serve_app.batching import BatchPolicy, MicroBatcher
from serve_app.config import BatchingConfig, IngressConfig, StoreConfig
from serve_app.gateway import Gateway
from serve_app.http import create_app
from serve_app.logs import configure_logging
from serve_app.metrics import IngressMetrics, ModelLabels
from serve_app.registry import Registry
from serve_app.schemas import BatchResult, PredictBatch, PredictCall, PredictResponse
from serve_app.stats import StatsRecorder
from serve_app.store import ModelStore


@serve.deployment(name="Ingress")
@serve.ingress()
class Ingress:
    """Front door of the `fleet` app: validate, resolve, route by model id to the host pool."""

    def __init__(
        self,
        host: DeploymentHandle,
        config: IngressConfig,
        store_config: StoreConfig,
        batching: BatchingConfig | None = None,
        host_replicas: int = 1,
    ) -> None:
        configure_logging()
        # NOTE: concurrent requests for one model travel to the host pool together, one
        # handle call per batch (the host batches again across ingress replicas); up to
        # `host_replicas` batches of a model are in flight so every holder stays busy.
        self._batching = batching or BatchingConfig()
        self._batch_in_flight = max(2, host_replicas)
        self._batcher: MicroBatcher[str, PredictCall, PredictResponse | BaseException] = (
            MicroBatcher(self._send_batch, self._batch_policy)
        )
        context = serve.get_replica_context()
        self._host = host
        self._app = context.app_name
        self._replica = context.replica_id.unique_id
        self._config = config
        self.registry = Registry(ModelStore(store_config), config.registry_refresh_s)
        self.registry.start()
        self.recorder = StatsRecorder()
        # NOTE: with one ingress replica there is nobody to share stats with; publishing
        # would only cost GIL time on the request path.
        self._stats_publisher = (
            ReplicaPublisher(
                self._app, "ingress", self._replica, source=self.recorder.snapshot, interval_s=2.0
            )
            if config.num_replicas > 1
            else None
        )
        self.gateway = Gateway(
            self.registry,
            self._dispatch,
            config,
            recorder=self.recorder,
            metrics=IngressMetrics(ModelLabels(config.max_model_labels)),
            peer_stats=lambda: read_replicas(self._app, "ingress", exclude=self._replica),
        )

    async def _dispatch(self, call: PredictCall) -> PredictResponse:
        if self._batching.for_model(call.manifest.model_id).max_batch_size <= 1:
            (outcome,) = await self._send_batch(call.manifest.key, [call])
        else:
            outcome = await self._batcher.submit(call.manifest.key, call, rows=len(call.inputs))
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    def _batch_policy(self, key: str) -> BatchPolicy:
        config = self._batching.for_model(key.split("@", 1)[0])
        return BatchPolicy(config.max_batch_size, config.max_wait_ms, self._batch_in_flight)

    async def _send_batch(
        self, key: str, calls: list[PredictCall]
    ) -> list[PredictResponse | BaseException]:
        manifest = calls[0].manifest
        batch = PredictBatch(manifest, [c.inputs for c in calls], [c.request_id for c in calls])
        handle = self._host.options(multiplexed_model_id=key)
        result: BatchResult = await handle.predict_batch.remote(batch)
        return [result.outcome(manifest, i) for i in range(len(calls))]

    def __serve_build_asgi_app__(self) -> FastAPI:
        app = create_app(self.gateway, self._config.max_body_bytes, self._config.stats_window_s)

        @app.get("/v1/replicas")
        async def replicas() -> list[dict[str, Any]]:
            """What every live model-host replica holds: budget, resident bytes, models."""
            return read_replicas(self._app, "hosts")

        return app

    async def predict(
        self, model_id: str, inputs: list[Any], version: str | None = None
    ) -> dict[str, Any]:
        """Handle API: predict `inputs` with `model_id`; returns the response as a dict."""
        return (await self.gateway.predict(model_id, inputs, version)).model_dump()

    async def predict_table(
        self, model_id: str, table: pa.Table, version: str | None = None
    ) -> pa.Table:
        """Handle API: score every row of a pyarrow table; returns it with outputs added."""
        return await self.gateway.predict_table(model_id, table, version)

    def models(self) -> list[dict[str, Any]]:
        """Handle API: the registry listing."""
        return [m.model_dump() for m in self.registry.summaries()]

    def stats(self, window_s: float | None = None) -> dict[str, Any]:
        """Handle API: per-model stats across ingress replicas (see GET /v1/stats)."""
        return self.gateway.stats(window_s or self._config.stats_window_s).model_dump()

    def __del__(self) -> None:
        self.registry.stop()
        if self._stats_publisher is not None:
            self._stats_publisher.close()
