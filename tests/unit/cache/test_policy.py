"""GDSF eviction policy: cost per byte, frequency, aging; in the real ModelCache; config."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from serve_app.cache.model_cache import CacheEntry, ModelCache
from serve_app.cache.policy import GDSFPolicy, LRUPolicy, make_policy
from serve_app.config import HostConfig
from tests.support import FakeModel

MB = 2**20


def entry(key: str, nbytes: int, load_seconds: float, at: float = 0.0) -> CacheEntry:
    return CacheEntry(key, FakeModel(key, nbytes), nbytes, load_seconds, at, at)


def order(policy: GDSFPolicy, *entries: CacheEntry) -> list[str]:
    return [e.key for e in policy.victims(entries)]


def test_evicts_the_fewest_reload_seconds_per_byte_first() -> None:
    policy = GDSFPolicy()
    cheap = entry("cheap", 100 * MB, 0.2, at=2)  # 2 ms per MB to reload
    dear = entry("dear", 100 * MB, 2.0, at=0)  # 20 ms per MB (slow storage, big build)
    small = entry("small", 1 * MB, 0.05, at=1)  # 50 ms per MB: fixed costs dominate
    for e in (cheap, dear, small):
        policy.on_load(e)
    # LRU would evict `dear` (oldest); GDSF gives up the cheapest reload per byte
    assert order(policy, dear, small, cheap) == ["cheap", "dear", "small"]
    assert [e.key for e in LRUPolicy().victims([dear, small, cheap])] == [
        "dear",
        "small",
        "cheap",
    ]


def test_frequency_raises_priority_and_ties_go_least_recently_used() -> None:
    policy = GDSFPolicy()
    a, b, c = entry("a", MB, 0.1, at=0), entry("b", MB, 0.1, at=1), entry("c", MB, 0.1, at=2)
    for e in (a, b, c):
        policy.on_load(e)
    assert order(policy, a, b, c) == ["a", "b", "c"]  # equal H: oldest first
    policy.on_hit(a)
    policy.on_hit(a)
    assert order(policy, a, b, c) == ["b", "c", "a"]
    assert policy.priority("a") == pytest.approx(3 * 0.1 / MB)


def test_inflation_ages_out_a_model_that_stops_being_requested() -> None:
    policy = GDSFPolicy()
    old = entry("old", MB, 0.1)
    policy.on_load(old)
    for _ in range(9):
        policy.on_hit(old)  # H = 10 units
    resident = [old]
    evicted_old_after = None
    for i in range(40):  # a stream of new models, each requested twice, old never again
        new = entry(f"n{i}", MB, 0.1, at=i + 1)
        policy.on_load(new)
        policy.on_hit(new)
        resident.append(new)
        victim = next(policy.victims(resident))
        policy.on_evict(victim)
        resident.remove(victim)
        if victim is old:
            evicted_old_after = i
            break
    assert evicted_old_after is not None, "a once-hot model must age out"
    assert evicted_old_after >= 4  # but only after newcomers lifted L past its priority
    assert policy.inflation > 0


def test_stale_evict_of_a_drained_entry_keeps_the_reloaded_one() -> None:
    policy = GDSFPolicy()
    first = entry("k", MB, 0.1)
    policy.on_load(first)
    again = entry("k", MB, 0.3)  # unloaded while leased, loaded again before it drained
    policy.on_load(again)
    policy.on_evict(first)  # the drained copy is freed last
    assert policy.priority("k") == pytest.approx(0.3 / MB)
    policy.on_evict(again)
    assert policy.priority("k") is None


def test_admin_unload_of_a_hot_model_does_not_age_the_rest() -> None:
    policy = GDSFPolicy()
    hot, cold = entry("hot", MB, 1.0), entry("cold", MB, 0.01)
    policy.on_load(hot)
    policy.on_load(cold)
    policy.on_evict(hot)
    assert policy.inflation == pytest.approx(0.01 / MB)  # L: the lowest H held, not hot's


async def test_gdsf_in_the_model_cache_keeps_the_expensive_model() -> None:
    now = [0.0]
    cache: ModelCache = ModelCache(100 * MB, policy=make_policy("gdsf"), clock=lambda: now[0])
    costs = {"slow": 3.0, "fast1": 0.1, "fast2": 0.1}
    sizes = {"slow": 40 * MB, "fast1": 40 * MB, "fast2": 40 * MB}

    async def get(key: str) -> None:
        async def load() -> FakeModel:
            now[0] += costs[key]
            return FakeModel(key, sizes[key])

        async with cache.lease(key, load, size_hint=sizes[key]):
            now[0] += 0.01

    await get("slow")
    await get("fast1")
    await get("fast2")  # LRU would evict `slow`, the least recently used
    assert cache.resident_keys() == ["slow", "fast2"]
    assert cache.stats.evicted_keys == ["fast1"]
    assert cache.entries()[0].load_seconds == pytest.approx(3.0)


def test_make_policy_and_config() -> None:
    assert isinstance(make_policy("lru"), LRUPolicy)
    assert make_policy("gdsf").name == "gdsf"
    assert make_policy("gdsf") is not make_policy("gdsf")  # fresh state per cache
    with pytest.raises(ValueError, match="unknown eviction policy"):
        make_policy("lfu")  # type: ignore[arg-type]
    assert HostConfig().eviction_policy == "lru"  # the documented default
    assert HostConfig(eviction_policy="gdsf").eviction_policy == "gdsf"
    with pytest.raises(ValidationError):
        HostConfig(eviction_policy="belady")
