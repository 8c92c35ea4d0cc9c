"""`build_app`: the `fleet` application from validated arguments (config.yaml `args:`)."""

from __future__ import annotations

import ray
from ray.serve import Application
from ray.serve._private.request_router.pow_2_router import PowerOfTwoChoicesRequestRouter
from ray.serve.config import RequestRouterConfig

from deployments.ingress import Ingress
from deployments.model_host import ModelHostDeployment
from deployments.router import ModelAffinityRouter
from serve_app.config import AppConfig


def _host_gpus(config: AppConfig) -> float:
    """GPUs per host replica: 1 for `cuda`, or for `auto` when the cluster has GPUs."""
    if config.host.accelerator == "cuda":
        return 1
    if config.host.accelerator == "auto" and ray.is_initialized():
        return 1 if ray.cluster_resources().get("GPU", 0) > 0 else 0
    return 0


def _router_class(config: AppConfig) -> type:
    if config.host.router == "ray":
        return PowerOfTwoChoicesRequestRouter
    return ModelAffinityRouter


def build_app(args: AppConfig) -> Application:
    """Build the ingress + model-host application; unknown or invalid args fail the deploy."""
    config = args if isinstance(args, AppConfig) else AppConfig.model_validate(args)
    host = ModelHostDeployment.options(
        num_replicas=config.host.num_replicas,
        max_ongoing_requests=config.host.max_ongoing_requests,
        ray_actor_options={"num_cpus": config.host.num_cpus, "num_gpus": _host_gpus(config)},
        request_router_config=RequestRouterConfig(request_router_class=_router_class(config)),
    ).bind(config.host, config.store)
    return Ingress.options(
        num_replicas=config.ingress.num_replicas,
        max_ongoing_requests=config.ingress.max_ongoing_requests,
        ray_actor_options={"num_cpus": config.ingress.num_cpus},
    ).bind(host, config.ingress, config.store, config.host.batching, config.host.num_replicas)
