"""The capacity plan: replays of one trace over a grid of replica counts and budgets.

For every (replicas, per-replica budget) pair: hit rate, cold starts per second, load
seconds (`replay.py`). For every replica count: the smallest per-replica budget that
reaches a target hit rate (bisection over budgets, each step a full replay).

Consolidation ratio, against one endpoint per model. The cost model, stated:

- what is paid for is provisioned accelerator memory, always on;
- a dedicated endpoint serves one model on instances of `endpoint_bytes` of memory (by
  default the fleet replica's budget: the same instance type), so model m needs
  `ceil(bytes_m / endpoint_bytes)` instances and at least one, however little traffic it gets;
- the fleet provisions `replicas x budget` bytes;
- ratio = (sum over the models of the trace of `ceil(bytes_m / endpoint_bytes) x
  endpoint_bytes`) / (replicas x budget). With equal instance types this is the number of
  dedicated instances over the number of fleet replicas.

Compute per request, network and the fleet's lower hit rate are not in the ratio; the hit
rate and cold starts beside it say what the consolidation costs in latency.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from serve_app.cache.policy import PolicyName
from serve_app.planning.replay import ReplayResult, replay
from serve_app.planning.trace import TraceRequest

COST_MODEL = (
    "cost = provisioned accelerator memory, always on; one endpoint per model needs "
    "ceil(model bytes / endpoint bytes) instances (at least 1) of endpoint bytes each; "
    "the fleet provisions replicas x budget; ratio = dedicated bytes / fleet bytes"
)


@dataclass
class Scenario:
    """One (replicas, budget) point of the plan."""

    result: ReplayResult
    dedicated_bytes: int
    consolidation_ratio: float

    def as_dict(self) -> dict[str, Any]:
        """JSON-friendly view."""
        return {
            **self.result.as_dict(),
            "fleet_bytes": self.result.replicas * self.result.budget_bytes,
            "dedicated_bytes": self.dedicated_bytes,
            "consolidation_ratio": round(self.consolidation_ratio, 2),
        }


@dataclass
class MemoryForTarget:
    """The smallest per-replica budget reaching the target hit rate at a replica count."""

    replicas: int
    target_hit_rate: float
    budget_bytes: int | None  # None: unreachable (compulsory misses alone exceed 1 - target)
    hit_rate: float | None
    consolidation_ratio: float | None

    def as_dict(self) -> dict[str, Any]:
        """JSON-friendly view."""
        return {
            "replicas": self.replicas,
            "target_hit_rate": self.target_hit_rate,
            "budget_bytes": self.budget_bytes,
            "total_bytes": None if self.budget_bytes is None else self.budget_bytes * self.replicas,
            "hit_rate": None if self.hit_rate is None else round(self.hit_rate, 4),
            "consolidation_ratio": None
            if self.consolidation_ratio is None
            else round(self.consolidation_ratio, 2),
        }


@dataclass
class Plan:
    """The whole report of `fleetserve plan`."""

    requests: int
    models: int
    model_bytes: int
    max_hit_rate: float
    scenarios: list[Scenario] = field(default_factory=list)
    targets: list[MemoryForTarget] = field(default_factory=list)
    cost_model: str = COST_MODEL

    def as_dict(self) -> dict[str, Any]:
        """JSON-friendly view."""
        return {
            "requests": self.requests,
            "models": self.models,
            "model_bytes": self.model_bytes,
            "max_hit_rate": round(self.max_hit_rate, 4),
            "cost_model": self.cost_model,
            "scenarios": [s.as_dict() for s in self.scenarios],
            "memory_for_target": [t.as_dict() for t in self.targets],
        }


def model_sizes(trace: Sequence[TraceRequest]) -> dict[str, int]:
    """Bytes of each distinct model version of the trace."""
    return {r.key: r.nbytes for r in trace}


def max_hit_rate(trace: Sequence[TraceRequest]) -> float:
    """The best any cache does: every request hits but each model's first."""
    return 1 - len(model_sizes(trace)) / len(trace) if trace else 0.0


def dedicated_bytes(sizes: dict[str, int], endpoint_bytes: int) -> int:
    """Memory one endpoint per model provisions (see the module's cost model)."""
    if endpoint_bytes <= 0:
        raise ValueError("endpoint_bytes must be positive")
    return sum(max(1, math.ceil(n / endpoint_bytes)) * endpoint_bytes for n in sizes.values())


def consolidation_ratio(
    sizes: dict[str, int], replicas: int, budget_bytes: int, endpoint_bytes: int | None = None
) -> float:
    """Dedicated endpoints' memory over the fleet's (see the module's cost model)."""
    return dedicated_bytes(sizes, endpoint_bytes or budget_bytes) / (replicas * budget_bytes)


def memory_for_hit_rate(
    trace: Sequence[TraceRequest],
    replicas: int,
    target: float,
    policy: PolicyName = "lru",
    resolution: float = 0.01,
    endpoint_bytes: int | None = None,
) -> MemoryForTarget:
    """Bisect the per-replica budget for the smallest that reaches `target` hit rate.

    Between the largest model (the least a replica can have) and the bytes of every model
    of the trace (where only first requests miss); stops when the bracket is within
    `resolution` of its upper end. Assumes more budget never lowers the hit rate, which
    holds for LRU over one replica and very nearly over several.
    """
    sizes = model_sizes(trace)
    if not trace or target > max_hit_rate(trace):
        return MemoryForTarget(replicas, target, None, None, None)
    low, high = max(sizes.values()), max(sum(sizes.values()), max(sizes.values()))
    best = replay(trace, replicas, high, policy)
    smallest = replay(trace, replicas, low, policy)
    if smallest.hit_rate >= target:
        high, best = low, smallest
    while high - low > resolution * high:
        middle = (low + high) // 2
        result = replay(trace, replicas, middle, policy)
        if result.hit_rate >= target:
            high, best = middle, result
        else:
            low = middle
    ratio = consolidation_ratio(sizes, replicas, high, endpoint_bytes)
    return MemoryForTarget(replicas, target, high, best.hit_rate, ratio)


def plan(
    trace: Sequence[TraceRequest],
    replica_counts: Sequence[int],
    budgets: Sequence[int],
    target_hit_rate: float | None = None,
    policy: PolicyName = "lru",
    endpoint_bytes: int | None = None,
) -> Plan:
    """Replay `trace` for every replica count and budget; see the module docstring."""
    if not trace:
        raise ValueError("the trace is empty")
    sizes = model_sizes(trace)
    report = Plan(len(trace), len(sizes), sum(sizes.values()), max_hit_rate(trace))
    for replicas in replica_counts:
        for budget in budgets:
            result = replay(trace, replicas, budget, policy)
            dedicated = dedicated_bytes(sizes, endpoint_bytes or budget)
            report.scenarios.append(Scenario(result, dedicated, dedicated / (replicas * budget)))
        if target_hit_rate is not None:
            report.targets.append(
                memory_for_hit_rate(
                    trace, replicas, target_hit_rate, policy, endpoint_bytes=endpoint_bytes
                )
            )
    return report


def format_plan(report: Plan) -> str:
    """The plan as a table for a terminal."""
    mb = 1e6
    lines = [
        f"{report.requests} requests over {report.models} model versions "
        f"({report.model_bytes / mb:.1f} MB); best possible hit rate "
        f"{report.max_hit_rate:.1%}",
        f"{'replicas':>8} {'budget MB':>10} {'hit rate':>9} {'cold/s':>8} {'load s':>9} "
        f"{'evictions':>9} {'consolidation':>13}",
    ]
    for s in report.scenarios:
        r = s.result
        cold = "-" if r.cold_starts_per_s is None else f"{r.cold_starts_per_s:.3f}"
        lines.append(
            f"{r.replicas:>8} {r.budget_bytes / mb:>10.1f} {r.hit_rate:>9.1%} {cold:>8} "
            f"{r.load_seconds:>9.1f} {r.evictions:>9} {s.consolidation_ratio:>12.1f}x"
            + (f"  ({r.too_large} requests for models over the budget: 507)" if r.too_large else "")
        )
    for t in report.targets:
        if t.budget_bytes is None:
            lines.append(
                f"{t.replicas} replicas: a {t.target_hit_rate:.1%} hit rate is out of reach "
                f"(first requests alone cap it at {report.max_hit_rate:.1%})"
            )
        else:
            lines.append(
                f"{t.replicas} replicas: {t.budget_bytes / mb:.1f} MB each "
                f"({t.budget_bytes * t.replicas / mb:.1f} MB in all) for a "
                f"{t.target_hit_rate:.1%} hit rate (replayed: {t.hit_rate:.1%}; "
                f"consolidation {t.consolidation_ratio:.1f}x)"
            )
    lines.append(f"cost model: {report.cost_model}")
    return "\n".join(lines)
