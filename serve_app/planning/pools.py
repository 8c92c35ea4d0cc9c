"""The plan of a deployed config: the trace split over its pools as the ingress splits it.

`Placement.pool_for` (serve_app/gateway/placement.py, the ingress's own rules: model-id
globs and manifest tags, first match wins, else the first pool) sends each request of the
trace to its pool; each pool's share is replayed on that pool's replicas, budget and
eviction policy (`replay.py`). Pins are not modelled: a pool's pinned models would take
their bytes off its budget for the whole trace.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from serve_app.config import AppConfig, PoolConfig, RoutingConfig
from serve_app.gateway.placement import Placement
from serve_app.planning.replay import ReplayResult, replay
from serve_app.planning.trace import TraceRequest
from serve_app.storage.manifest import Manifest


@dataclass
class PoolPlan:
    """One pool's share of the trace, replayed as the config deploys the pool."""

    pool: str
    result: ReplayResult


def pool_replicas(pool: PoolConfig) -> int:
    """Replicas a pool runs: `num_replicas`, or its autoscaling maximum."""
    if pool.autoscaling:
        return int(pool.autoscaling.get("max_replicas", pool.num_replicas))
    return pool.num_replicas


def split_by_pool(
    trace: Sequence[TraceRequest], placement: Placement, manifests: Mapping[str, Manifest]
) -> dict[str, list[TraceRequest]]:
    """Each pool's requests, in trace order (pools without requests included, empty)."""
    shares: dict[str, list[TraceRequest]] = {name: [] for name in placement.pools}
    for request in trace:
        shares[placement.pool_for(manifests[request.key])].append(request)
    return shares


def replay_config(
    trace: Sequence[TraceRequest],
    config: AppConfig,
    routing: RoutingConfig,
    manifests: Mapping[str, Manifest],
    budget_bytes: int | None = None,
) -> list[PoolPlan]:
    """Replay `trace` on the pools of `config`, split by `routing.rules`.

    Args:
        budget_bytes: per-replica budget of pools that have none in the config (GPU pools
            sized by `gpu_memory_fraction` of a device this machine does not have).

    Raises:
        ValueError: a pool has no memory budget and none is given.
    """
    pools = config.pool_configs()
    placement = Placement(routing.rules, [p.name for p in pools])
    shares = split_by_pool(trace, placement, manifests)
    plans = []
    for pool in pools:
        budget = pool.memory_budget or budget_bytes
        if budget is None:
            raise ValueError(
                f"pool {pool.name!r} has no memory_budget (its GPU decides): give the "
                "per-replica budget to plan with, e.g. --budget 16GiB"
            )
        result = replay(shares[pool.name], pool_replicas(pool), budget, pool.eviction_policy)
        plans.append(PoolPlan(pool.name, result))
    return plans


def overall_hit_rate(plans: Sequence[PoolPlan]) -> float:
    """Hits over requests across every pool."""
    requests = sum(p.result.requests for p in plans)
    return sum(p.result.hits for p in plans) / requests if requests else 0.0


def routing_of(serve_config: Mapping[str, Any], app_name: str = "fleet") -> RoutingConfig:
    """The routing a Serve config gives its ingress: the `Ingress` deployment's
    `user_config` when there is one, else `args.routing` (README: "Live changes")."""
    for app in serve_config.get("applications", []):
        if app.get("name") != app_name:
            continue
        for deployment in app.get("deployments") or []:
            if deployment.get("name") == "Ingress" and deployment.get("user_config"):
                return RoutingConfig.model_validate(deployment["user_config"])
        return AppConfig.model_validate(app.get("args") or {}).routing
    raise ValueError(f"the config has no application named {app_name!r}")


def format_pools(plans: Sequence[PoolPlan]) -> str:
    """The per-pool plan as a table."""
    lines = [
        f"{'pool':<16} {'replicas':>8} {'budget MB':>10} {'requests':>9} {'hit rate':>9} "
        f"{'cold/s':>8} {'load s':>9}"
    ]
    for plan in plans:
        r = plan.result
        cold = "-" if r.cold_starts_per_s is None else f"{r.cold_starts_per_s:.3f}"
        lines.append(
            f"{plan.pool:<16} {r.replicas:>8} {r.budget_bytes / 1e6:>10.1f} {r.requests:>9} "
            f"{r.hit_rate:>9.1%} {cold:>8} {r.load_seconds:>9.1f}"
        )
    lines.append(f"overall hit rate {overall_hit_rate(plans):.1%}")
    return "\n".join(lines)
