"""ModelCache: LRU by bytes, single-flight, concurrent loads, leases, failure memory, 507."""

from __future__ import annotations

import asyncio

import pytest

from serve_app.cache import ModelCache
from serve_app.errors import ArtifactCorrupt, LoadTimeout, ModelLoadFailed, ModelTooLarge
from tests.fakes import FakeLoader

MB = 2**20


async def get(cache: ModelCache, loader: FakeLoader, key: str, hint: int = 0):
    async with cache.lease(key, loader(key), size_hint=hint) as lease:
        return lease


async def test_lru_order_and_byte_budget() -> None:
    loader = FakeLoader({"a": 40 * MB, "b": 40 * MB, "c": 40 * MB})
    cache: ModelCache = ModelCache(100 * MB)
    await get(cache, loader, "a")
    await get(cache, loader, "b")
    await get(cache, loader, "a")  # a is now most recently used
    await get(cache, loader, "c")  # needs 40 MB: evicts b (LRU), not a
    assert cache.resident_keys() == ["a", "c"]
    assert loader.models["b"].closed
    assert not loader.models["a"].closed
    assert cache.resident_bytes == 80 * MB <= cache.budget_bytes
    assert cache.stats.evicted_keys == ["b"]


async def test_evicts_as_many_small_models_as_a_big_one_needs() -> None:
    sizes = {f"s{i}": 10 * MB for i in range(9)} | {"big": 75 * MB}
    loader = FakeLoader(sizes)
    cache: ModelCache = ModelCache(100 * MB)
    for i in range(9):
        await get(cache, loader, f"s{i}")
    assert cache.resident_bytes == 90 * MB
    await get(cache, loader, "big")
    # 75 MB needs 65 MB freed from 90: the 7 least recently used go, the 2 newest stay
    assert cache.resident_keys() == ["s7", "s8", "big"]
    assert cache.resident_bytes == 95 * MB == sum(e.nbytes for e in cache.entries())
    assert cache.resident_count == 3


async def test_hit_reports_resident_and_no_second_load() -> None:
    loader = FakeLoader({"a": MB})
    cache: ModelCache = ModelCache(10 * MB)
    first = await get(cache, loader, "a")
    second = await get(cache, loader, "a")
    assert (first.hit, second.hit) == (False, True)
    assert loader.calls == ["a"]
    assert (cache.stats.hits, cache.stats.misses) == (1, 1)


async def test_concurrent_requests_for_one_model_share_one_load() -> None:
    loader = FakeLoader({"a": MB})
    gate = loader.gate("a")
    cache: ModelCache = ModelCache(10 * MB)
    tasks = [asyncio.create_task(get(cache, loader, "a")) for _ in range(8)]
    await asyncio.sleep(0.01)
    assert loader.calls == ["a"]
    assert cache.loading_keys() == ["a"]
    gate.set()
    leases = await asyncio.gather(*tasks)
    assert loader.calls == ["a"]
    assert all(lease.model is leases[0].model for lease in leases)
    assert cache.resident_keys() == ["a"]
    assert cache.entries()[0].leases == 0


async def test_different_models_load_concurrently() -> None:
    loader = FakeLoader({"a": MB, "b": MB})
    gates = [loader.gate("a"), loader.gate("b")]
    cache: ModelCache = ModelCache(10 * MB, max_concurrent_loads=2)
    tasks = [asyncio.create_task(get(cache, loader, k)) for k in ("a", "b")]
    await asyncio.sleep(0.01)
    assert loader.running == 2  # both loads in flight at once (Ray's multiplexer: 1)
    for gate in gates:
        gate.set()
    await asyncio.gather(*tasks)
    assert loader.max_running == 2


async def test_load_concurrency_is_bounded() -> None:
    loader = FakeLoader(dict.fromkeys("abc", MB))
    gates = [loader.gate(k) for k in "abc"]
    cache: ModelCache = ModelCache(10 * MB, max_concurrent_loads=2)
    tasks = [asyncio.create_task(get(cache, loader, k)) for k in "abc"]
    await asyncio.sleep(0.01)
    assert loader.running == 2
    for gate in gates:
        gate.set()
    await asyncio.gather(*tasks)
    assert loader.max_running == 2
    assert sorted(cache.resident_keys()) == ["a", "b", "c"]


async def test_model_in_use_is_never_evicted() -> None:
    loader = FakeLoader({"a": 60 * MB, "b": 60 * MB})
    cache: ModelCache = ModelCache(100 * MB, load_timeout_s=5)
    async with cache.lease("a", loader("a")) as held:
        task = asyncio.create_task(get(cache, loader, "b", hint=60 * MB))
        await asyncio.sleep(0.05)
        # b cannot fit while a is leased: it waits, a stays loaded and open
        assert not task.done()
        assert cache.resident_keys() == ["a"]
        assert not held.model.closed
    await task  # the lease ended: a is evicted, b loads
    assert cache.resident_keys() == ["b"]
    assert loader.models["a"].closed


async def test_waiting_for_room_times_out_with_503() -> None:
    loader = FakeLoader({"a": 60 * MB, "b": 60 * MB})
    cache: ModelCache = ModelCache(100 * MB, load_timeout_s=0.05)
    async with cache.lease("a", loader("a")):
        with pytest.raises(LoadTimeout) as info:
            await get(cache, loader, "b", hint=60 * MB)
    assert info.value.status_code == 503
    assert cache.resident_keys() == ["a"]


async def test_reservations_keep_concurrent_loads_within_budget() -> None:
    loader = FakeLoader({"a": 60 * MB, "b": 60 * MB})
    gate_a = loader.gate("a")
    cache: ModelCache = ModelCache(100 * MB, load_timeout_s=5)
    task_a = asyncio.create_task(get(cache, loader, "a", hint=60 * MB))
    await asyncio.sleep(0.01)
    task_b = asyncio.create_task(get(cache, loader, "b", hint=60 * MB))
    await asyncio.sleep(0.01)
    assert loader.calls == ["a"]  # b waits: a's 60 MB are reserved while it loads
    gate_a.set()
    await asyncio.gather(task_a, task_b)
    assert cache.resident_keys() == ["b"]
    assert cache.stats.peak_resident_bytes <= cache.budget_bytes


async def test_failed_load_is_remembered_then_retried() -> None:
    now = [0.0]
    loader = FakeLoader({"bad": MB}, failures={"bad": ArtifactCorrupt("sha256 mismatch")})
    cache: ModelCache = ModelCache(10 * MB, failure_ttl_s=10, clock=lambda: now[0])
    for _ in range(5):
        with pytest.raises(ArtifactCorrupt):
            await get(cache, loader, "bad")
    assert loader.calls == ["bad"]  # one load, four answers from failure memory
    assert cache.resident_keys() == []
    now[0] = 11.0
    del loader.failures["bad"]
    await get(cache, loader, "bad")
    assert loader.calls == ["bad", "bad"]
    assert cache.resident_keys() == ["bad"]


async def test_unexpected_loader_error_becomes_model_load_failed() -> None:
    loader = FakeLoader({"x": MB}, failures={"x": RuntimeError("boom")})
    cache: ModelCache = ModelCache(10 * MB)
    with pytest.raises(ModelLoadFailed) as info:
        await get(cache, loader, "x")
    assert info.value.status_code == 500
    assert "boom" not in str(info.value)


async def test_model_larger_than_budget_is_507_before_loading() -> None:
    loader = FakeLoader({"huge": 200 * MB})
    cache: ModelCache = ModelCache(100 * MB)
    with pytest.raises(ModelTooLarge) as info:
        await get(cache, loader, "huge", hint=200 * MB)
    assert info.value.status_code == 507
    assert "budget" in info.value.message
    assert loader.calls == []


async def test_measured_size_over_budget_is_507_and_freed() -> None:
    loader = FakeLoader({"sneaky": 150 * MB, "small": MB})
    cache: ModelCache = ModelCache(100 * MB)
    await get(cache, loader, "small")
    with pytest.raises(ModelTooLarge):
        await get(cache, loader, "sneaky", hint=10 * MB)  # hint lies; measured size rules
    assert loader.models["sneaky"].closed
    assert cache.resident_keys() == ["small"]


async def test_cancelled_caller_does_not_cancel_shared_load_or_leak_lease() -> None:
    loader = FakeLoader({"a": MB})
    gate = loader.gate("a")
    cache: ModelCache = ModelCache(10 * MB)
    quitter = asyncio.create_task(get(cache, loader, "a"))
    stayer = asyncio.create_task(get(cache, loader, "a"))
    await asyncio.sleep(0.01)
    quitter.cancel()
    await asyncio.sleep(0.01)
    gate.set()
    lease = await stayer
    assert not lease.hit
    assert cache.entries()[0].leases == 0
    assert await cache.evict("a")


async def test_routing_keys_follow_loads_and_evictions() -> None:
    seen: list[list[str]] = []
    loader = FakeLoader({"a": 60 * MB, "b": 60 * MB})
    cache: ModelCache = ModelCache(100 * MB)
    cache._on_change = lambda: seen.append(cache.routing_keys())
    await get(cache, loader, "a")
    await get(cache, loader, "b")
    assert ["a"] in seen  # advertised once loaded
    assert seen[-1] == ["b"]  # a evicted: no longer advertised
