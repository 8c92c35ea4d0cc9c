"""Ingress deployment: the FastAPI app and the handle API, over `serve_app.gateway.Gateway`.

HTTP routes come from `serve_app.http.create_app`; Ray jobs call the methods below through
`serve.get_app_handle("fleet")`. Management commands reach host replicas through
`ServeHostControl` (see deployments/router.py for how a command finds its replica).
"""

from __future__ import annotations

import asyncio
from typing import Any

import pyarrow as pa
from fastapi import FastAPI
from ray import serve
from ray.serve.handle import DeploymentHandle

from deployments.replica_directory import GcsKeyValue, ReplicaPublisher, read_replicas
from serve_app.config import IngressConfig, StoreConfig
from serve_app.errors import CommandMisrouted, ReplicaUnavailable, unwrap
from serve_app.gateway import Gateway
from serve_app.http import create_app
from serve_app.logs import configure_logging
from serve_app.management import ModelManager
from serve_app.metrics import IngressMetrics, ModelLabels
from serve_app.pins import PinStore
from serve_app.registry import Registry
from serve_app.schemas import HostCommand, HostReply, PredictCall, PredictResponse
from serve_app.stats import StatsRecorder
from serve_app.store import ModelStore

MISROUTE_ATTEMPTS = 5


class ServeHostControl:
    """`serve_app.management.HostControl` over Serve: the replica directory for state,
    the host handle for commands (the router delivers each to the replica it names)."""

    def __init__(self, host: DeploymentHandle, app: str, timeout_s: float) -> None:
        self._host = host
        self._app = app
        self._timeout_s = timeout_s

    def replicas(self) -> list[dict[str, Any]]:
        """Published state of every live host replica."""
        return read_replicas(self._app, "hosts", check_alive=True)

    async def command(self, command: HostCommand) -> HostReply:
        """Run `command` on its replica; resend if Serve handed it to another one.

        Raises:
            ReplicaUnavailable: the replica did not answer within the timeout.
            FleetError: what the replica raised.
        """
        for _ in range(MISROUTE_ATTEMPTS):
            response = self._host.manage.remote(command)
            try:
                return await asyncio.wait_for(response, self._timeout_s)
            except TimeoutError:
                response.cancel()
                raise ReplicaUnavailable(
                    f"replica {command.replica} did not finish {command.op} of {command.key} "
                    f"within {self._timeout_s:.0f}s",
                    retry_after_s=2.0,
                ) from None
            except Exception as exc:
                if not isinstance(unwrap(exc), CommandMisrouted):
                    raise
        raise ReplicaUnavailable(
            f"{command.op} of {command.key} could not be delivered to replica {command.replica}",
            retry_after_s=2.0,
        )


@serve.deployment(name="Ingress")
@serve.ingress()
class Ingress:
    """Front door of the `fleet` app: validate, resolve, route by model id to the host pool."""

    def __init__(
        self, host: DeploymentHandle, config: IngressConfig, store_config: StoreConfig
    ) -> None:
        configure_logging()
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

        self.manager = ModelManager(
            self.registry,
            ServeHostControl(host, self._app, config.management.command_timeout_s),
            PinStore(GcsKeyValue(), self._app),
        )

    async def _dispatch(self, call: PredictCall) -> PredictResponse:
        handle = self._host.options(multiplexed_model_id=call.manifest.key)
        return await handle.predict.remote(call)

    def __serve_build_asgi_app__(self) -> FastAPI:
        return create_app(
            self.gateway,
            self._config.max_body_bytes,
            self._config.stats_window_s,
            manager=self.manager,
            management=self._config.management,
        )

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
