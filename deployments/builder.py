"""`build_app`: the `fleet` application from validated arguments (config.yaml `args:`).

One Ingress and one model-host deployment per pool (`ModelHost` for the default pool,
`ModelHost-<name>` for others), each with its own replicas, budget, accelerator and
autoscaling. The routing goes to the Ingress as Serve `user_config`, never as an init
argument, so a `serve deploy` that changes only the Ingress's `user_config` reconfigures the
running replicas instead of restarting them (see README, "Versions, splits, pins, pools").
"""

from __future__ import annotations

import logging

import ray
from ray.serve import Application
from ray.serve._private.request_router.pow_2_router import PowerOfTwoChoicesRequestRouter
from ray.serve.config import RequestRouterConfig

from deployments.ingress import Ingress
from deployments.model_host import ModelHostDeployment
from deployments.router import ModelAffinityRouter
from serve_app.config import AppConfig, HostConfig
from serve_app.errors import InvalidRouting, StorageUnavailable
from serve_app.gateway.routing_table import RoutingTable
from serve_app.storage.registry import Registry
from serve_app.storage.store import ModelStore

logger = logging.getLogger(__name__)


def _host_gpus(host: HostConfig) -> float:
    """GPUs per host replica: 1 for `cuda`, or for `auto` when the cluster has GPUs."""
    if host.accelerator == "cuda":
        return 1
    if host.accelerator == "auto" and ray.is_initialized():
        return 1 if ray.cluster_resources().get("GPU", 0) > 0 else 0
    return 0


def _router_class(pool: HostConfig) -> type:
    """`router: ray` selects Ray's stock router (the benchmarks' baseline)."""
    if pool.router == "ray":
        return PowerOfTwoChoicesRequestRouter
    return ModelAffinityRouter


def check_routing(config: AppConfig) -> None:
    """Check `config.routing` against the store's registry (unknown models, pins that do
    not fit); skipped with a warning when the store cannot be read.

    Raises:
        ValueError: with what to fix.
    """
    routing = config.routing
    if not (routing.aliases or routing.pins or routing.default_versions):
        return
    registry = Registry(ModelStore(config.store))
    if not registry.refresh_quietly():
        logger.warning("routing not checked against the store: %s", registry.last_error)
        return
    try:
        RoutingTable(routing, config.pool_configs(), registry)
    except InvalidRouting as exc:
        raise ValueError(f"routing: {exc.message}") from exc
    except StorageUnavailable:  # pragma: no cover - refreshed just above
        return


def build_app(args: AppConfig | dict) -> Application:
    """Build the ingress + model-host pools; invalid args fail the deploy with what to fix."""
    config = args if isinstance(args, AppConfig) else AppConfig.model_validate(args)
    check_routing(config)
    pools = {}
    for pool in config.pool_configs():
        options = {
            "name": pool.deployment_name,
            "max_ongoing_requests": pool.max_ongoing_requests,
            "ray_actor_options": {"num_cpus": pool.num_cpus, "num_gpus": _host_gpus(pool)},
            "request_router_config": RequestRouterConfig(request_router_class=_router_class(pool)),
            # NOTE: every request already gets an access line at the ingress (Serve's and
            # ours); Serve's per-call line in the host took ~4% of the host's GIL time on
            # the hot path. A `logging_config` for the host in config.yaml overrides this.
            "logging_config": {"enable_access_log": False},
        }
        if pool.autoscaling is not None:
            options["autoscaling_config"] = dict(pool.autoscaling)  # Serve validates it
        else:
            options["num_replicas"] = pool.num_replicas
        pools[pool.name] = ModelHostDeployment.options(**options).bind(pool, config.store)
    return Ingress.options(
        num_replicas=config.ingress.num_replicas,
        max_ongoing_requests=config.ingress.max_ongoing_requests,
        ray_actor_options={"num_cpus": config.ingress.num_cpus},
        user_config=config.routing.model_dump(mode="json"),
    ).bind(pools, config.pool_configs(), config.ingress, config.store)
