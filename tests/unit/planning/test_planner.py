"""The capacity planner: replays through the real ModelCache agree with the trace simulator,
place models the way the router does, and the plan's numbers follow from the inputs."""

from __future__ import annotations

import asyncio
import json
import logging

import pytest

from bench.cache_simulation import simulate
from serve_app.cache.policy import GDSFPolicy, LRUPolicy
from serve_app.gateway.replica_ranking import rank_for_load
from serve_app.observability.logs import JsonFormatter
from serve_app.planning.capacity import (
    consolidation_ratio,
    dedicated_bytes,
    format_plan,
    max_hit_rate,
    memory_for_hit_rate,
    plan,
)
from serve_app.planning.replay import SimReplica, _route, replay, trace_duration
from serve_app.planning.trace import (
    LoadTimeModel,
    TraceRequest,
    read_access_log,
    trace_from_access_log,
    zipf_trace,
)

MB = 10**6
MODELS = [(f"m{i:02d}@1", (1 + i % 7) * MB, 0.1 + 0.02 * i) for i in range(30)]


def _trace(length: int = 3000, seed: int = 1, alpha: float = 0.9) -> list[TraceRequest]:
    return zipf_trace(MODELS, alpha, length, seed, rate_per_s=50)


@pytest.mark.parametrize("policy", ["lru", "gdsf"])
def test_one_replica_replay_matches_the_simulator_request_for_request(policy: str) -> None:
    trace = _trace()
    real = replay(trace, 1, 20 * MB, policy)  # the real ModelCache
    sim = simulate(trace, LRUPolicy() if policy == "lru" else GDSFPolicy(), budget_bytes=20 * MB)
    assert (real.misses, real.evictions) == (sim.misses, sim.evictions)
    assert real.load_seconds == pytest.approx(sim.load_seconds)
    assert 0 < real.hit_rate < 1


def test_two_replicas_share_the_traffic_and_lose_little_against_one_of_twice_the_budget() -> None:
    trace = _trace(2000, seed=3)
    result = replay(trace, 2, 15 * MB)
    single = replay(trace, 1, 30 * MB)
    # the same total memory split in two loses a little (each replica evicts on its own)
    assert result.hit_rate <= single.hit_rate + 0.02
    assert sum(result.per_replica_requests.values()) == len(trace)
    assert min(result.per_replica_requests.values()) > 0.2 * len(trace)


async def test_routing_sends_warm_requests_to_the_holder_and_cold_ones_by_free_budget() -> None:
    import random

    from serve_app.cache.model_cache import ModelCache

    class M:
        def __init__(self, n: int) -> None:
            self.nbytes = n

        def close(self) -> None:
            pass

    pool = [SimReplica(f"r{i}", ModelCache(10 * MB)) for i in range(2)]

    async def load_on(replica: SimReplica, key: str, n: int) -> None:
        async def load() -> M:
            return M(n)

        lease = await replica.cache.acquire(key, load, n)
        replica.cache.release(key, lease.model)

    await load_on(pool[0], "big@1", 8 * MB)
    rng = random.Random(0)
    assert _route(pool, "big@1", rng) is pool[0]  # warm: the holder
    assert _route(pool, "new@1", rng) is pool[1]  # cold: most free budget
    assert rank_for_load(pool, "new@1") == [pool[1], pool[0]]
    await load_on(pool[1], "other@1", 9 * MB)
    assert _route(pool, "new2@1", rng) is pool[0]  # now pool[0] has more room


def test_cold_starts_per_second_and_load_seconds_follow_the_trace() -> None:
    trace = [
        TraceRequest("a@1", 6, 2.0, 0.0),
        TraceRequest("b@1", 6, 3.0, 1.0),
        TraceRequest("a@1", 6, 2.0, 2.0),
        TraceRequest("a@1", 6, 2.0, 3.0),
    ]
    result = replay(trace, 1, 10)
    assert (result.hits, result.misses) == (1, 3)  # a, b evicts a, a evicts b, a hit
    assert result.load_seconds == pytest.approx(7.0)
    assert result.duration_s == 4.0  # whole-second stamps count their last second
    assert result.cold_starts_per_s == pytest.approx(0.75)
    assert trace_duration([TraceRequest("a@1", 1, 1.0)]) == 0.0


def test_memory_for_a_target_hit_rate_is_the_smallest_budget_that_reaches_it() -> None:
    trace = _trace(2000, seed=5)
    target = 0.8
    found = memory_for_hit_rate(trace, 2, target, resolution=0.01)
    assert found.budget_bytes is not None
    assert replay(trace, 2, found.budget_bytes).hit_rate >= target
    assert replay(trace, 2, int(found.budget_bytes * 0.97)).hit_rate < target
    unreachable = memory_for_hit_rate(trace, 2, max_hit_rate(trace) + 0.001)
    assert unreachable.budget_bytes is None


def test_consolidation_ratio_is_computed_from_the_sizes() -> None:
    sizes = {"a@1": 3, "b@1": 5, "c@1": 12}
    assert dedicated_bytes(sizes, 10) == 10 + 10 + 20  # c needs two instances
    assert consolidation_ratio(sizes, replicas=2, budget_bytes=10) == pytest.approx(2.0)
    assert consolidation_ratio(sizes, 1, 20, endpoint_bytes=5) == pytest.approx((5 + 5 + 15) / 20)


def test_plan_reports_every_scenario_and_its_table() -> None:
    trace = _trace(1500)
    report = plan(trace, [1, 2], [10 * MB, 20 * MB], target_hit_rate=0.7)
    assert [(s.result.replicas, s.result.budget_bytes) for s in report.scenarios] == [
        (1, 10 * MB),
        (1, 20 * MB),
        (2, 10 * MB),
        (2, 20 * MB),
    ]
    rates = [s.result.hit_rate for s in report.scenarios]
    assert rates[0] < rates[1] <= rates[3] + 0.02
    assert len(report.targets) == 2
    text = format_plan(report)
    assert "consolidation" in text
    assert "cost model" in text
    json.dumps(report.as_dict())


def _access_lines() -> list[str]:
    """Lines as the ingress writes them: its access logger's records, JSON-formatted."""
    formatter = JsonFormatter()
    log = logging.getLogger("serve_app.access")
    lines = []
    for model, status, cold, wait in [
        ("a", 200, True, 1500.0),
        ("a", 200, False, 0.0),
        ("b", 200, True, 250.0),
        ("b", 404, None, 0.0),
        ("a", 200, True, 500.0),
    ]:
        extra = {
            "request_id": "x",
            "model_id": model,
            "version": "1",
            "status": status,
            "replica": "r",
            "cold": cold,
            "load_wait_ms": wait,
            "latency_ms": 1.0,
        }
        record = log.makeRecord(
            log.name, logging.INFO, __file__, 1, "request", (), None, extra=extra
        )
        lines.append(formatter.format(record))
    return [
        "(ServeReplica:fleet:Ingress pid=1) " + lines[0],
        '{"logger": "serve_app.cache.model_cache", "msg": "model loaded"}',
        "not json at all",
        *lines[1:],
    ]


def test_access_log_becomes_a_trace_with_measured_load_times() -> None:
    events = read_access_log(_access_lines())
    assert [e.key for e in events] == ["a@1", "a@1", "b@1", "a@1"]  # the 404 is dropped
    trace = trace_from_access_log(events, {"a@1": 100, "b@1": 50}, LoadTimeModel(1.0, 1.0))
    assert [r.load_seconds for r in trace] == [1.0, 1.0, 0.25, 1.0]  # median of 1.5 and 0.5
    assert trace[0].at == 0.0
    with pytest.raises(KeyError, match="b@1"):
        trace_from_access_log(events, {"a@1": 100})


async def test_replay_runs_from_inside_a_running_event_loop_like_a_notebook() -> None:
    trace = _trace(500)
    assert replay(trace, 2, 10 * MB).hit_rate == pytest.approx(
        (await asyncio.to_thread(replay, trace, 2, 10 * MB)).hit_rate
    )


def test_a_model_over_the_budget_is_refused_like_the_live_pool_not_a_crash() -> None:
    trace = [
        TraceRequest("small@1", 4, 1.0, 0.0),
        TraceRequest("huge@1", 50, 1.0, 1.0),
        TraceRequest("small@1", 4, 1.0, 2.0),
    ]
    result = replay(trace, 1, 10)
    assert (result.hits, result.misses, result.too_large) == (1, 1, 1)
    assert result.hit_rate == pytest.approx(1 / 3)
    assert "507" in format_plan(plan(trace, [1], [10]))
