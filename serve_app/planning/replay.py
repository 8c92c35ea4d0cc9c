"""Replay of a trace over a pool of model-host replicas, with the real cache and routing code.

Each simulated replica is a real `ModelCache` (serve_app/cache/model_cache.py) with a real
eviction policy (`make_policy`), driven on an asyncio loop with a virtual clock; its loads
are stand-ins that return a model of the trace's bytes and move the clock on by the trace's
load seconds. Requests are placed the way `deployments/router.py` places them:

- a model some replica holds or is loading (the keys a host advertises:
  `ModelCache.routing_keys()`) goes to one of those holders (Serve picks the less busy of
  two; in a one-at-a-time replay every replica is idle, so it is a seeded random holder);
- a cold model goes to the first replica of `rank_for_load` (serve_app/gateway/
  replica_ranking.py, the router's own function), fed with the routing stats a host
  reports (budget, resident and reserved bytes).

What it does not model: concurrency (requests are replayed one at a time, as a sequential
client sends them), the router's stats lag (a host's stats reach the router within about a
second; the replay sees them at once), pins, copies of hot models and failed loads other
than a model too large for the budget.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from serve_app.cache.model_cache import ModelCache
from serve_app.cache.policy import PolicyName, make_policy
from serve_app.errors import ModelTooLarge
from serve_app.gateway.replica_ranking import rank_for_load
from serve_app.planning.trace import TraceRequest


class VirtualClock:
    """The replay's time: the trace's arrival times, moved on by each load's seconds."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@dataclass
class _Model:
    """What a simulated load makes resident: only its size matters."""

    size: int

    @property
    def nbytes(self) -> int:
        return self.size

    def close(self) -> None:
        """Nothing to free."""


@dataclass(frozen=True)
class _ReplicaId:
    unique_id: str


@dataclass
class SimReplica:
    """One model-host replica of the replay: a real `ModelCache`, seen as the router sees it."""

    name: str
    cache: ModelCache[_Model]

    @property
    def replica_id(self) -> _ReplicaId:
        return _ReplicaId(self.name)

    @property
    def multiplexed_model_ids(self) -> set[str]:
        return set(self.cache.routing_keys())

    @property
    def routing_stats(self) -> dict[str, Any]:
        # NOTE: the keys of ModelHostDeployment.record_routing_stats.
        return {
            "budget_bytes": self.cache.budget_bytes,
            "resident_bytes": self.cache.resident_bytes,
            "reserved_bytes": self.cache.reserved_bytes,
        }


@dataclass
class ReplayResult:
    """What a replay of one trace on one pool cost."""

    replicas: int
    budget_bytes: int
    policy: str
    requests: int = 0
    hits: int = 0
    misses: int = 0
    load_seconds: float = 0.0
    evictions: int = 0
    too_large: int = 0  # requests for models larger than a replica's budget (507)
    duration_s: float = 0.0
    per_replica_requests: dict[str, int] = field(default_factory=dict)

    @property
    def hit_rate(self) -> float:
        """Requests served by a resident model, per request."""
        return self.hits / self.requests if self.requests else 0.0

    @property
    def cold_starts_per_s(self) -> float | None:
        """Loads per second of trace time (None for a trace without times)."""
        return self.misses / self.duration_s if self.duration_s > 0 else None

    def as_dict(self) -> dict[str, Any]:
        """JSON-friendly view (the CLI's `--json`)."""
        return {
            "replicas": self.replicas,
            "budget_bytes": self.budget_bytes,
            "policy": self.policy,
            "requests": self.requests,
            "hit_rate": round(self.hit_rate, 4),
            "cold_starts": self.misses,
            "cold_starts_per_s": None
            if self.cold_starts_per_s is None
            else round(self.cold_starts_per_s, 4),
            "load_seconds": round(self.load_seconds, 3),
            "evictions": self.evictions,
            "too_large": self.too_large,
            "duration_s": round(self.duration_s, 3),
        }


def trace_duration(trace: Sequence[TraceRequest]) -> float:
    """Seconds the trace spans; a log's whole-second stamps count their last second too."""
    if not trace:
        return 0.0
    span = trace[-1].at - trace[0].at
    if span == 0.0 and trace[-1].at == 0.0:
        return 0.0  # a trace without times
    if all(float(r.at).is_integer() for r in trace):
        span += 1.0
    return span


def replay(
    trace: Sequence[TraceRequest],
    replicas: int,
    budget_bytes: int,
    policy: PolicyName = "lru",
    seed: int = 0,
) -> ReplayResult:
    """Replay `trace` on `replicas` model-host replicas of `budget_bytes` each.

    Requests for a model larger than the budget are counted in `too_large` (the live pool
    answers them 507 `model_too_large`), and count against the hit rate.
    """
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(_replay(trace, replicas, budget_bytes, policy, seed))
    # NOTE: called from a running event loop (a notebook, an async caller): the replay gets
    # a loop of its own on a worker thread, so its caches never mix with the caller's tasks.
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="plan-replay") as worker:
        return worker.submit(
            asyncio.run, _replay(trace, replicas, budget_bytes, policy, seed)
        ).result()


async def _replay(
    trace: Sequence[TraceRequest],
    replicas: int,
    budget_bytes: int,
    policy: PolicyName,
    seed: int,
) -> ReplayResult:
    if replicas < 1:
        raise ValueError("replicas must be at least 1")
    clock = VirtualClock()
    pool = [
        SimReplica(
            f"r{i:03d}",
            ModelCache(
                budget_bytes,
                max_concurrent_loads=1,
                failure_ttl_s=0.0,
                policy=make_policy(policy),
                clock=clock,
            ),
        )
        for i in range(replicas)
    ]
    rng = random.Random(seed)
    result = ReplayResult(replicas, budget_bytes, policy, duration_s=trace_duration(trace))
    for request in trace:
        clock.now = max(clock.now, request.at)
        replica = _route(pool, request.key, rng)
        result.requests += 1
        try:
            lease = await replica.cache.acquire(
                request.key, _loader(request, clock), size_hint=request.nbytes
            )
        except ModelTooLarge:
            result.too_large += 1  # the live pool answers 507: neither a hit nor a load
            continue
        replica.cache.release(request.key, lease.model)
        result.per_replica_requests[replica.name] = (
            result.per_replica_requests.get(replica.name, 0) + 1
        )
        if lease.hit:
            result.hits += 1
        else:
            result.misses += 1
            result.load_seconds += request.load_seconds
    result.evictions = sum(r.cache.stats.evictions for r in pool)
    return result


def _route(pool: list[SimReplica], key: str, rng: random.Random) -> SimReplica:
    """The replica `deployments/router.py` would send a request for `key` to."""
    holders = [r for r in pool if key in r.multiplexed_model_ids]
    if holders:
        return rng.choice(holders)
    return rank_for_load(pool, key)[0]


def _loader(request: TraceRequest, clock: VirtualClock):  # type: ignore[no-untyped-def]
    async def load() -> _Model:
        clock.now += request.load_seconds
        return _Model(request.nbytes)

    return load
