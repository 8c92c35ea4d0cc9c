"""Extra copies of hot models in the cache: evicted before any other model when room is
needed, dropped once idle for the cooling time, never while leased or pinned."""

from __future__ import annotations

from serve_app.cache.model_cache import ModelCache
from tests.support import FakeLoader

MB = 2**20


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


async def touch(cache: ModelCache, loader: FakeLoader, key: str) -> None:
    async with cache.lease(key, loader(key)):
        pass


async def test_a_copy_is_evicted_before_older_models() -> None:
    loader = FakeLoader({"old": 40 * MB, "copy": 40 * MB, "new": 40 * MB})
    cache: ModelCache = ModelCache(100 * MB)
    await touch(cache, loader, "old")
    await touch(cache, loader, "copy")
    cache.mark_copy("copy")
    await touch(cache, loader, "copy")  # the copy is the most recently used
    await touch(cache, loader, "new")
    assert cache.resident_keys() == ["old", "new"]  # LRU would have evicted "old"
    assert cache.copy_keys() == []


async def test_idle_copies_go_after_the_cooling_time_and_busy_ones_stay() -> None:
    clock = Clock()
    loader = FakeLoader({"a": MB, "b": MB, "c": MB})
    cache: ModelCache = ModelCache(100 * MB, clock=clock)
    for key in "abc":
        await touch(cache, loader, key)
    cache.mark_copy("a")
    cache.mark_copy("b")
    assert cache.copy_keys() == ["a", "b"]
    clock.now += 20
    await touch(cache, loader, "b")  # b still serves
    lease = await cache.acquire("a", loader("a"))  # a is leased right now
    assert cache.evict_idle_copies(10) == []
    cache.release("a", lease.model)
    clock.now += 1
    assert cache.evict_idle_copies(10) == []  # a was just used
    clock.now += 10
    assert sorted(cache.evict_idle_copies(10)) == ["a", "b"]
    assert cache.resident_keys() == ["c"]  # never marked: stays however idle


async def test_a_pinned_model_is_never_a_copy() -> None:
    loader = FakeLoader({"p": MB})
    cache: ModelCache = ModelCache(100 * MB)
    await touch(cache, loader, "p")
    cache.mark_copy("p")
    cache.pin("p", MB)
    assert cache.copy_keys() == []
    cache.mark_copy("p")
    assert cache.copy_keys() == []
