"""`build_app`: the `fleet` application from validated arguments (config.yaml `args:`).

One Ingress and one model-host deployment per pool (`ModelHost` for the default pool,
`ModelHost-<name>` for others), each with its own replicas, budget, accelerator and
autoscaling. The routing goes to the Ingress and to every model-host deployment as Serve
`user_config`, never as an init argument, so a `serve deploy` that changes only user_config
reconfigures the running replicas instead of restarting them (see README, "Versions, splits,
pins, pools"). The Ingress routes by it; each host keeps resident the pins its rules place in
its pool (deployments/model_host.py). Hosts get pin references, not manifests: they resolve
them from the store themselves (`serve_app.host.config_pins`), because a pin without a
version follows the latest version, a store unreadable at deploy time is retried later, and
a `deployments:` override in a Serve config replaces this user_config without running
`build_app` at all.

Args are another matter: Serve 2.60 hashes an app's import path, `args` and runtime env into
its code version, and a new code version restarts every deployment of the app (their
DeploymentVersion's code_version changes), so pools, budgets and replicas stay in `args`
and what changes live stays in user_config.
"""

from __future__ import annotations

import logging
from typing import Any

import ray
from ray.serve import Application
from ray.serve.config import RequestRouterConfig

from deployments.autoscaling import POLICY_PATH
from deployments.ingress import Ingress
from deployments.model_host import ModelHostDeployment
from deployments.ray_internals import SERVE_THROUGHPUT_ENV
from deployments.router import ModelAffinityRouter
from serve_app.config import AppConfig, HostConfig, PoolConfig
from serve_app.errors import InvalidRouting, StorageUnavailable
from serve_app.gateway.routing_table import RoutingTable
from serve_app.storage.registry import Registry
from serve_app.storage.store import ModelStore

logger = logging.getLogger(__name__)

# NOTE: how often Serve's controller asks each host replica for its budget
# (`ModelHostDeployment.record_routing_stats`) and rebroadcasts it to the routers when it
# changed; the router places cold models by it.
ROUTING_STATS_PERIOD_S = 1.0


def _host_gpus(host: HostConfig) -> float:
    """GPUs per host replica: 1 for `cuda`, or for `auto` when the cluster has GPUs."""
    if host.accelerator == "cuda":
        return 1
    if host.accelerator == "auto" and ray.is_initialized():
        return 1 if ray.cluster_resources().get("GPU", 0) > 0 else 0
    return 0


def _router_config(pool: PoolConfig) -> RequestRouterConfig:
    """`router: ray` keeps Serve's default router and settings (the benchmarks' baseline:
    a `RequestRouterConfig` without a class is Serve's power-of-two-choices router)."""
    if pool.router == "ray":
        return RequestRouterConfig()
    return RequestRouterConfig(
        request_router_class=ModelAffinityRouter,
        request_routing_stats_period_s=ROUTING_STATS_PERIOD_S,
        request_router_kwargs={"hot_copies": pool.hot_copies.model_dump()},
    )


def _autoscaling_config(pool: PoolConfig) -> dict[str, Any]:
    """The pool's Serve autoscaling_config; with `autoscale_on_working_set`, through the
    working-set policy (deployments/autoscaling.py)."""
    config = dict(pool.autoscaling or {})
    working_set = pool.autoscale_on_working_set
    if working_set is not None:
        config["policy"] = {
            "policy_function": POLICY_PATH,
            "policy_kwargs": {"target_fill": working_set.target_fill},
        }
    return config


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
    routing = config.routing.model_dump(mode="json")
    pool_names = [p.name for p in config.pool_configs()]
    for pool in config.pool_configs():
        options = {
            "name": pool.deployment_name,
            "max_ongoing_requests": pool.max_ongoing_requests,
            "ray_actor_options": _actor_options(
                pool.num_cpus, _host_gpus(pool), pool.resources, _env(pool.serve_env)
            ),
            "request_router_config": _router_config(pool),
            # NOTE: every request already gets an access line at the ingress (Serve's and
            # ours); Serve's per-call line in the host took ~4% of the host's GIL time on
            # the hot path. A `logging_config` for the host in config.yaml overrides this.
            "logging_config": {"enable_access_log": False},
            # NOTE: the routing, for the pins it places in this pool (see module docstring).
            "user_config": routing,
        }
        if pool.autoscale_on_working_set is not None and pool.autoscaling is None:
            raise ValueError(f"pool {pool.name}: autoscale_on_working_set needs autoscaling")
        if pool.autoscaling is not None:
            options["autoscaling_config"] = _autoscaling_config(pool)  # Serve validates it
        else:
            options["num_replicas"] = pool.num_replicas
        if pool.max_replicas_per_node is not None:
            options["max_replicas_per_node"] = pool.max_replicas_per_node
        # NOTE: management switched off also stops hosts applying its stored pins.
        pools[pool.name] = ModelHostDeployment.options(**options).bind(
            pool, config.store, pool_names, store_pins=config.ingress.management.enabled
        )
    ingress = config.ingress
    scaling: dict[str, Any] = (
        {"autoscaling_config": dict(ingress.autoscaling)}
        if ingress.autoscaling is not None
        else {"num_replicas": ingress.num_replicas}
    )
    return Ingress.options(
        **scaling,
        max_ongoing_requests=ingress.max_ongoing_requests,
        ray_actor_options=_actor_options(
            ingress.num_cpus, 0, ingress.resources, _env(ingress.serve_env)
        ),
        user_config=routing,
    ).bind(pools, config.pool_configs(), ingress, config.store, config.auth)


def _env(serve_env: dict[str, str] | None) -> dict[str, str]:
    """A deployment's replica environment: Serve's throughput settings unless configured."""
    return dict(SERVE_THROUGHPUT_ENV) if serve_env is None else serve_env


def _actor_options(
    num_cpus: float, num_gpus: float, resources: dict[str, float], env: dict[str, str]
) -> dict:
    """Serve `ray_actor_options`; custom resources and a runtime_env only when asked for
    (Serve merges these env_vars into the application's runtime_env)."""
    options: dict[str, Any] = {"num_cpus": num_cpus, "num_gpus": num_gpus}
    if env:
        options["runtime_env"] = {"env_vars": dict(env)}
    if resources:
        options["resources"] = dict(resources)
    return options
