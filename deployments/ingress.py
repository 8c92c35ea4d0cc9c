"""Ingress deployment: the FastAPI app and the handle API, over `serve_app.gateway.gateway.Gateway`.

HTTP routes come from `serve_app.api.app.create_app`; Ray jobs call the methods below through
`serve.get_app_handle("fleet")`. Management commands reach host replicas through
`ServeHostControl` (see deployments/router.py for how a command finds its replica).

The routing (aliases, splits, default versions, pool rules, pins) is this deployment's Serve
`user_config`: `reconfigure()` validates it against the pools and the registry and swaps it in
whole, or refuses it and keeps the accepted one (a refused config is logged and shown at
`GET /v1/routing`). Only the very first config, with nothing accepted before, fails the
replica. The accepted config is recorded in the model store (`AcceptedRouting`, see
`serve_app.storage.state_store`), where a replica started later finds it.

Config pins are not this deployment's to deliver: every model-host deployment gets the same
routing as its own `user_config` and applies the pins placed in its pool
(deployments/model_host.py); here they are only checked (unknown models, pool budgets).
Pins of the management API are records in the model store too (`PinStore` over
`StoreKeyValue`), which hosts apply every few seconds.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import pyarrow as pa
from fastapi import FastAPI
from pydantic import ValidationError
from ray import serve
from ray.serve.handle import DeploymentHandle

from deployments.dispatch import HostDispatch
from deployments.replica_directory import ReplicaPublisher, read_replicas
from serve_app.api.app import create_app
from serve_app.api.auth import Authorizer
from serve_app.auth.keys import hash_key
from serve_app.auth.tenants import ResidencyView, Tenants
from serve_app.config import (
    DEFAULT_POOL,
    AuthConfig,
    IngressConfig,
    PoolConfig,
    RoutingConfig,
    StoreConfig,
    describe_errors,
)
from serve_app.errors import (
    CommandMisrouted,
    InvalidRouting,
    ReplicaUnavailable,
    StorageUnavailable,
    status_of,
    unwrap,
)
from serve_app.gateway.gateway import Gateway
from serve_app.gateway.routing_table import RoutingTable
from serve_app.management.manager import ModelManager
from serve_app.management.pins import PinStore
from serve_app.observability.logs import configure_logging
from serve_app.observability.metrics import (
    ArmMetrics,
    IngressMetrics,
    ModelLabels,
    TenantMetrics,
)
from serve_app.observability.stats import StatsRecorder
from serve_app.schemas import (
    HostCommand,
    HostReply,
    PredictResponse,
)
from serve_app.storage.registry import Registry
from serve_app.storage.state_store import AcceptedRouting, StoreKeyValue
from serve_app.storage.store import ModelStore

logger = logging.getLogger(__name__)
MISROUTE_ATTEMPTS = 5


class ServeHostControl:
    """`serve_app.management.manager.HostControl` over Serve: the replica directory for state,
    the pools' host handles for commands (the router delivers each to the replica it
    names, through the handle of that replica's pool)."""

    def __init__(self, pools: dict[str, DeploymentHandle], app: str, timeout_s: float) -> None:
        self._pools = pools
        self._app = app
        self._timeout_s = timeout_s
        self._pool_of: dict[str, str] = {}

    def replicas(self) -> list[dict[str, Any]]:
        """Published state of every live host replica."""
        live = read_replicas(self._app, "hosts", check_alive=True)
        self._pool_of = {r["replica"]: r.get("pool", DEFAULT_POOL) for r in live}
        return live

    async def command(self, command: HostCommand) -> HostReply:
        """Run `command` on its replica; resend if Serve handed it to another one.

        Raises:
            ReplicaUnavailable: the replica did not answer within the timeout.
            FleetError: what the replica raised.
        """
        if command.replica not in self._pool_of:
            # NOTE: GCS reads (and actor lookups): never on the event loop.
            await asyncio.to_thread(self.replicas)
        pool = self._pools.get(self._pool_of.get(command.replica, DEFAULT_POOL))
        if pool is None:
            raise ReplicaUnavailable(f"replica {command.replica} is in no pool of this app")
        for _ in range(MISROUTE_ATTEMPTS):
            response = pool.manage.remote(command)
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
    """Front door of the `fleet` app: validate, resolve, route by model id to its pool."""

    def __init__(
        self,
        pools: dict[str, DeploymentHandle],
        pool_configs: list[PoolConfig],
        config: IngressConfig,
        store_config: StoreConfig,
        auth: AuthConfig | None = None,
    ) -> None:
        configure_logging()
        context = serve.get_replica_context()
        self._dispatch = HostDispatch(pools, pool_configs, context.app_name).dispatch
        self._pools = pools
        self._pool_configs = pool_configs
        self._app = context.app_name
        self._replica = context.replica_id.unique_id
        self._config = config
        self.registry = Registry(ModelStore(store_config), config.registry_refresh_s)
        self.registry.start()
        # NOTE: serving state (the accepted routing, the API's pins) lives in the model store.
        state = StoreKeyValue.of(self.registry.store)
        self._accepted_routing = AcceptedRouting(state, self._app)
        self.recorder = StatsRecorder()
        self._residency = ResidencyView(lambda: read_replicas(self._app, "hosts"))
        admin_key = config.management.resolved_admin_key()
        self.tenants = Tenants(
            auth or AuthConfig(),
            None if admin_key is None else hash_key(admin_key),
            self.registry,
            is_alias=lambda name: name in self.gateway.routing.config.aliases,
            resident=self._residency.keys,
        )
        if self.tenants.enabled and self.tenants.caps_cold_loads:
            self._residency.start()
        self.gateway = Gateway(
            self.registry,
            # NOTE: the cold-load gate only where tenants are configured (the hot path
            # without tenants is the plain dispatch).
            self.tenants.gate(self._dispatch, key_of=lambda call: call.manifest.key)
            if self.tenants.enabled
            else self._dispatch,
            config,
            recorder=self.recorder,
            metrics=IngressMetrics(ModelLabels(config.max_model_labels)),
            peer_stats=lambda: read_replicas(self._app, "ingress", exclude=self._replica),
            host_states=lambda: read_replicas(self._app, "hosts"),
            routing=RoutingTable(RoutingConfig(), pool_configs, self.registry),
            arm_metrics=ArmMetrics(),
        )
        # NOTE: with one ingress replica there is nobody to share stats with; publishing
        # would only cost GIL time on the request path.
        self.auth = Authorizer(
            self.tenants,
            metrics=TenantMetrics() if self.tenants.enabled else None,
            peers=lambda: read_replicas(self._app, "ingress", exclude=self._replica),
        )
        self._stats_publisher = (
            ReplicaPublisher(
                self._app,
                "ingress",
                self._replica,
                source=lambda: {**self.gateway.published(), "tenants": self.auth.ledger.snapshot()},
                interval_s=2.0,
            )
            if config.may_scale_out
            else None
        )
        self._accepted = False
        # NOTE: every registry change re-checks the routing (from the refresh thread): a
        # routing accepted while the registry was unreadable is validated (and recorded)
        # then, and vanished targets show at GET /v1/routing.
        self.registry.on_change = self._on_registry_change
        self.manager = ModelManager(
            self.registry,
            ServeHostControl(pools, self._app, config.management.command_timeout_s),
            PinStore(state, self._app),
            pool_for=lambda manifest: self.gateway.routing.placement.pool_for(manifest),
        )

    async def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Apply a routing config (Serve `user_config`): swap it in, or refuse it and keep
        the accepted one. Raises only when no config was ever accepted for this app."""
        try:
            table = await asyncio.to_thread(self._compile, user_config)
        except InvalidRouting as exc:
            fallback = None if self._accepted else await asyncio.to_thread(self._fallback)
            if not self._accepted and fallback is None:
                raise
            logger.error("routing config refused", extra={"error": exc.message})
            if fallback is not None:
                self.gateway.set_routing(fallback)
                self._accepted = True
            self.gateway.reject_routing(user_config, exc.message)
            return
        self.gateway.set_routing(table)
        self._accepted = True
        logger.info(
            "routing config applied",
            extra={"aliases": sorted(table.config.aliases), "checked": table.checked},
        )
        if table.checked:
            # NOTE: one accepted while the registry was unreadable is recorded only once
            # the registry re-check has validated it (Gateway.recheck_routing).
            await asyncio.to_thread(self._save_accepted, table.config.model_dump(mode="json"))
        elif self.registry.age_s is not None:
            # NOTE: the registry was first read while this table was being built: the
            # change callback checked the previous table, so check this one now.
            await asyncio.to_thread(
                self.gateway.recheck_routing, self._save_accepted, self._fallback
            )

    def _on_registry_change(self) -> None:
        """Re-check the routing against the changed registry (from the refresh thread)."""
        # NOTE: before the first reconfigure() the default routing serves: it is nobody's
        # accepted config, and recording it would overwrite the one in the store.
        if self._accepted:
            self.gateway.recheck_routing(self._save_accepted, self._fallback)

    def _save_accepted(self, config: dict[str, Any]) -> None:
        """Record `config` as the accepted routing (blocking: S3)."""
        try:
            self._accepted_routing.save(config)
        except StorageUnavailable as exc:
            # NOTE: the record is only a fallback for replicas started later with a refused
            # config; failing the reconfigure would make Serve stop this replica.
            logger.warning("accepted routing not recorded", extra={"error": exc.message})

    def _compile(self, user_config: dict[str, Any]) -> RoutingTable:
        try:
            config = RoutingConfig.model_validate(user_config or {})
        except ValidationError as exc:
            raise InvalidRouting(f"routing config refused: {describe_errors(exc)}") from exc
        try:
            return RoutingTable(config, self._pool_configs, self.registry)
        except InvalidRouting as exc:
            raise InvalidRouting(f"routing config refused: {exc.message}") from exc

    def _fallback(self) -> RoutingTable | None:
        try:
            accepted = self._accepted_routing.read()
        except StorageUnavailable as exc:
            logger.warning("accepted routing not readable", extra={"error": exc.message})
            return None
        if accepted is None:
            return None
        try:
            return self._compile(accepted)
        except InvalidRouting:
            return None

    def __serve_build_asgi_app__(self) -> FastAPI:
        return create_app(
            self.gateway,
            self._config.max_body_bytes,
            self._config.stats_window_s,
            manager=self.manager,
            management=self._config.management,
            auth=self.auth,
        )

    async def predict(
        self,
        model_id: str,
        inputs: list[Any],
        version: str | None = None,
        sticky_key: str | None = None,
        tenant: str | None = None,
    ) -> dict[str, Any]:
        """Handle API: predict `inputs` with `model_id` (id, `id@version` or alias; a
        `sticky_key` keeps a caller on one alias arm); returns the response as a dict.

        Handle callers are inside Ray's trust boundary (they hold the cluster token): no
        key is asked. A `tenant` name applies that tenant's scope, rate and cold-load cap
        and accounts the call to it."""
        return await self._as_tenant(
            tenant,
            model_id,
            version,
            self.gateway.predict(model_id, inputs, version, sticky_key=sticky_key),
        )

    async def predict_table(
        self,
        model_id: str,
        table: pa.Table,
        version: str | None = None,
        tenant: str | None = None,
    ) -> pa.Table:
        """Handle API: score every row of a pyarrow table; returns it with outputs added
        (`tenant` as in `predict`)."""
        return await self._as_tenant(
            tenant, model_id, version, self.gateway.predict_table(model_id, table, version)
        )

    async def _as_tenant(
        self, tenant: str | None, model_id: str, version: str | None, work: Any
    ) -> Any:
        started = time.perf_counter()
        status = 500
        try:
            self.tenants.for_handle(tenant, model_id, version)
            result = await work
            status = 200
        except BaseException as exc:
            work.close()  # NOTE: never awaited when the check refused the call
            status = status_of(exc)
            raise
        finally:
            if tenant is not None and self.tenants.enabled:
                name = tenant if tenant in self.tenants.by_name else "anonymous"
                self.auth.account(name, status, (time.perf_counter() - started) * 1000)
        return result.model_dump() if isinstance(result, PredictResponse) else result

    def models(self) -> list[dict[str, Any]]:
        """Handle API: the registry listing."""
        return [m.model_dump() for m in self.registry.summaries()]

    def stats(self, window_s: float | None = None) -> dict[str, Any]:
        """Handle API: per-model stats across ingress replicas (see GET /v1/stats)."""
        return self.gateway.stats(window_s or self._config.stats_window_s).model_dump()

    def routing(self) -> dict[str, Any]:
        """Handle API: the active routing, the last refused config and per-arm counters."""
        return self.gateway.routing_report()

    def __del__(self) -> None:
        self._residency.stop()
        self.registry.stop()
        if self._stats_publisher is not None:
            self._stats_publisher.close()
