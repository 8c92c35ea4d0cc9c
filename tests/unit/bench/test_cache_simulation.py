"""Trace simulator and offline bounds: hand-checked traces, and agreement with ModelCache."""

from __future__ import annotations

import random

import pytest

from bench.cache_simulation import (
    TraceRequest,
    belady_size,
    offline_bounds,
    simulate,
    zipf_trace,
)
from serve_app.cache.model_cache import ModelCache
from serve_app.cache.policy import GDSFPolicy, LRUPolicy
from tests.support import FakeModel


def trace_of(keys: str, sizes: dict[str, int], costs: dict[str, float] | None = None):
    costs = costs or {}
    return [TraceRequest(k, sizes[k], costs.get(k, 1.0)) for k in keys]


UNIT = dict.fromkeys("abcd", 1)


def test_lru_on_a_cyclic_trace_misses_every_time_belady_only_half() -> None:
    trace = trace_of("abcabcabc", UNIT)
    lru = simulate(trace, LRUPolicy(), budget_bytes=2)
    assert (lru.misses, lru.evictions, lru.peak_bytes) == (9, 7, 2)
    # Belady by hand: a b c(evict b) a* b(evict a) c* a(evict c) b* c(evict ..)  -> 6 misses
    assert belady_size(trace, 2).misses == 6
    bounds = offline_bounds(trace, 2, "misses")
    assert bounds.lower == pytest.approx(6)
    assert bounds.upper == 6  # equal sizes: the LP is integral, both bounds are OPT


def test_lru_hits_and_recency_order_by_hand() -> None:
    sizes = {"a": 4, "b": 4, "c": 4}
    # budget 8: a b a c -> c evicts b (LRU), then b misses again and evicts a
    result = simulate(trace_of("abacb", sizes), LRUPolicy(), budget_bytes=8)
    assert (result.misses, result.evictions) == (4, 2)
    assert result.load_seconds == pytest.approx(4.0)


def test_variable_sizes_lp_bound_is_fractional_and_below_opt() -> None:
    # Two models of 6 in a budget of 10: neither can stay while the other is served, so OPT
    # misses all 4 requests; the LP may keep 4/6 of each interval: 2 + 1/3 + 1/3.
    trace = trace_of("abab", {"a": 6, "b": 6})
    bounds = offline_bounds(trace, 10, "misses")
    assert bounds.lower == pytest.approx(2 + 2 / 3)
    assert bounds.upper == 4
    assert simulate(trace, LRUPolicy(), budget_bytes=10).misses == 4


def test_load_seconds_objective_weights_each_reload_by_its_cost() -> None:
    # budget 10: the big model (6) and two small ones (3 each) cannot all stay. Reloading
    # `big` costs 5 s, a small one 1 s: OPT keeps big and reloads the small ones.
    sizes = {"big": 6, "s1": 3, "s2": 3}
    costs = {"big": 5.0, "s1": 1.0, "s2": 1.0}
    trace = trace_of(["big", "s1", "s2", "big", "s1", "s2", "big"], sizes, costs)
    bounds = offline_bounds(trace, 10, "load_seconds")
    # compulsory 7 s; then keep big (both intervals), reload s1 or s2 twice: +2 s at best
    assert bounds.upper == pytest.approx(9.0)
    assert bounds.lower <= 9.0 + 1e-9
    lru = simulate(trace, LRUPolicy(), budget_bytes=10)
    gdsf = simulate(trace, GDSFPolicy(), budget_bytes=10)
    assert lru.load_seconds == pytest.approx(19.0)  # LRU evicts big before each use: all miss
    assert gdsf.load_seconds == pytest.approx(9.0)  # cost per byte keeps big: optimal here
    assert gdsf.load_seconds >= bounds.lower - 1e-9


def test_count_limit_ignores_bytes_like_ray_multiplexed() -> None:
    sizes = {"a": 1, "b": 50, "c": 50}
    result = simulate(trace_of("abcab", sizes), LRUPolicy(), max_models=2, name="ray-lru")
    assert result.name == "ray-lru"
    assert result.misses == 5
    assert result.peak_models == 2
    assert result.peak_bytes == 100  # two big ones: a count says nothing about bytes


def test_simulate_rejects_no_limit_and_models_over_the_budget() -> None:
    trace = trace_of("a", {"a": 5})
    with pytest.raises(ValueError, match="budget_bytes"):
        simulate(trace, LRUPolicy())
    with pytest.raises(ValueError, match="exceeds"):
        simulate(trace, LRUPolicy(), budget_bytes=4)
    with pytest.raises(ValueError, match="exceeds"):
        offline_bounds(trace, 4)


def random_models(rng: random.Random, n: int) -> list[tuple[str, int, float]]:
    # costs on a 1/1024 s grid: exact in binary floating point, so sums compare exactly
    return [(f"m{i}", rng.randint(1, 40), rng.randint(1, 4096) / 1024) for i in range(n)]


@pytest.mark.parametrize("seed", range(6))
def test_bounds_bracket_every_policy_on_random_traces(seed: int) -> None:
    rng = random.Random(seed)
    trace = zipf_trace(random_models(rng, 25), alpha=0.9, length=400, seed=seed)
    budget = 120
    for objective in ("misses", "load_seconds"):
        bounds = offline_bounds(trace, budget, objective)
        assert bounds.lower <= bounds.upper + 1e-9
        assert bounds.upper <= belady_size(trace, budget).cost(objective) + 1e-9
        for policy in (LRUPolicy(), GDSFPolicy()):
            result = simulate(trace, policy, budget_bytes=budget)
            assert result.peak_bytes <= budget
            assert result.cost(objective) >= bounds.lower - 1e-6


@pytest.mark.parametrize("seed", range(4))
def test_equal_sizes_lower_bound_equals_belady_min(seed: int) -> None:
    models = [(f"m{i}", 10, 1.0) for i in range(20)]
    trace = zipf_trace(models, alpha=0.8, length=300, seed=seed)
    bounds = offline_bounds(trace, 50, "misses")
    assert bounds.lower == pytest.approx(belady_size(trace, 50).misses)
    assert bounds.upper == belady_size(trace, 50).misses


def test_zipf_trace_is_seeded_and_skewed() -> None:
    models = [(f"m{i}", 1, 1.0) for i in range(30)]
    first = zipf_trace(models, alpha=1.1, length=2000, seed=3)
    assert first == zipf_trace(models, alpha=1.1, length=2000, seed=3)
    assert first != zipf_trace(models, alpha=1.1, length=2000, seed=4)
    counts = sorted((sum(r.key == k for r in first) for k, _, _ in models), reverse=True)
    assert counts[0] > 5 * counts[-1]  # rank 1 vs rank 30: 30**1.1 = 42x in expectation


class ManualClock:
    """Time that moves only when a fake load takes its trace's seconds."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


async def replay_on_model_cache(trace, policy, budget: int) -> tuple[int, list[str], list[str]]:
    """Drive the real ModelCache with the trace, one request at a time."""
    clock = ManualClock()
    cache: ModelCache = ModelCache(budget, policy=policy, clock=clock)
    for request in trace:

        async def load(request: TraceRequest = request) -> FakeModel:
            clock.now += request.load_seconds
            return FakeModel(request.key, request.nbytes)

        lease = await cache.acquire(request.key, load, size_hint=request.nbytes)
        cache.release(request.key, lease.model)
        clock.now += 1 / 1024  # requests are apart in time, as in the simulator
    return cache.stats.misses, list(cache.stats.evicted_keys), sorted(cache.resident_keys())


@pytest.mark.parametrize("policy_class", [LRUPolicy, GDSFPolicy])
@pytest.mark.parametrize("seed", range(3))
async def test_simulator_agrees_with_the_real_model_cache(policy_class, seed: int) -> None:
    rng = random.Random(100 + seed)
    trace = zipf_trace(random_models(rng, 30), alpha=0.9, length=500, seed=seed)
    budget = 150
    misses, evicted, resident = await replay_on_model_cache(trace, policy_class(), budget)
    simulated = simulate(trace, policy_class(), budget_bytes=budget)
    assert misses == simulated.misses
    assert len(evicted) == simulated.evictions > 0
    # same victims in the same order, same models left
    assert evicted == simulated.evicted_keys[-1000:]
    assert resident == sorted(simulated.resident_keys)
