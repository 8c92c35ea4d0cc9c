"""Eviction policies: which idle models a full cache gives up first.

`ModelCache` delegates the *order* of eviction to a policy; the cache itself still decides
*whether* an entry may go (never while leased, never while pinned). A policy sees every
load, hit and eviction so it can keep its own priorities.

`LRUPolicy` (least recently used first) is the default: the cache keeps its entries in
recency order, so LRU needs no state of its own. `GDSFPolicy` (GreedyDual-Size-Frequency)
is the cost-aware option: it keeps the models whose reloads would cost the most seconds per
byte of budget. Hosts pick one with `host.eviction_policy: lru | gdsf`; `make_policy()`
turns that name into a fresh policy. `bench/cache_simulation.py` replays traces against
either, and bench/b5_policy.py compares them with the offline optimum.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Literal, Protocol

if TYPE_CHECKING:
    from serve_app.cache.model_cache import CacheEntry

PolicyName = Literal["lru", "gdsf"]


class EvictionPolicy(Protocol):
    """Orders eviction candidates; told about every load, hit and eviction."""

    name: str

    def on_load(self, entry: CacheEntry) -> None:
        """`entry` became resident (its `nbytes` and `load_seconds` are measured)."""
        ...

    def on_hit(self, entry: CacheEntry) -> None:
        """`entry` served a request while resident."""
        ...

    def on_evict(self, entry: CacheEntry) -> None:
        """`entry` left the cache."""
        ...

    def victims(self, entries: Iterable[CacheEntry]) -> Iterator[CacheEntry]:
        """`entries` (least recently used first) in the order they should be evicted."""
        ...


class LRUPolicy:
    """Least recently used first (the cache's own recency order)."""

    name = "lru"

    def on_load(self, entry: CacheEntry) -> None:
        """Nothing to track: recency is the cache's order."""

    def on_hit(self, entry: CacheEntry) -> None:
        """Nothing to track: recency is the cache's order."""

    def on_evict(self, entry: CacheEntry) -> None:
        """Nothing to track: recency is the cache's order."""

    def victims(self, entries: Iterable[CacheEntry]) -> Iterator[CacheEntry]:
        """The entries as given: least recently used first."""
        return iter(entries)


class GDSFPolicy:
    """GreedyDual-Size-Frequency (Cherkasova 1998) weighted by each model's measured
    reload cost.

    Every resident model has a priority `H = L + frequency * cost / size`: `cost` is the
    seconds its load took (`CacheEntry.load_seconds`, measured by the cache), `size` its
    measured bytes and `frequency` the requests it served since it was loaded. The victim is
    the model with the lowest H (ties: least recently used). `L`, the inflation value, rises
    to the H of each model evicted, so a model that stops being requested ages out however
    popular it was. Per byte of budget, the models whose reloads would cost the most
    seconds stay; with load time roughly proportional to bytes this is close to
    frequency-per-byte, and the fixed part of a load favours keeping small hot models.
    """

    name = "gdsf"

    def __init__(self, min_cost_s: float = 1e-3) -> None:
        """Args:
        min_cost_s: floor of a load's cost, so near-instant loads still rank by frequency
            and size instead of all sharing the inflation value.
        """
        self.min_cost_s = min_cost_s
        self._inflation = 0.0
        self._priority: dict[str, float] = {}
        self._frequency: dict[str, int] = {}
        self._tracked: dict[str, CacheEntry] = {}

    @property
    def inflation(self) -> float:
        """The current L (the lowest priority held when the last model was evicted)."""
        return self._inflation

    def priority(self, key: str) -> float | None:
        """H of a resident model (None if the policy does not track it)."""
        return self._priority.get(key)

    def on_load(self, entry: CacheEntry) -> None:
        """Start `entry` at frequency 1, above the current inflation value."""
        self._tracked[entry.key] = entry
        self._frequency[entry.key] = 1
        self._reprioritise(entry)

    def on_hit(self, entry: CacheEntry) -> None:
        """Count the request and raise `entry`'s priority from the current L."""
        self._tracked[entry.key] = entry
        self._frequency[entry.key] = self._frequency.get(entry.key, 0) + 1
        self._reprioritise(entry)

    def on_evict(self, entry: CacheEntry) -> None:
        """Age the cache to the lowest priority held, and forget `entry`."""
        # NOTE: a drained unload is freed after its last lease ends, possibly after the
        # same key was loaded again: only the entry the policy tracks may be forgotten.
        if self._tracked.get(entry.key) is not entry:
            return
        # NOTE: L rises to the lowest priority held, not blindly to the evicted one's: an
        # admin unload of a high-priority model must not age every other model at once.
        self._inflation = max(self._inflation, min(self._priority.values()))
        del self._tracked[entry.key], self._priority[entry.key], self._frequency[entry.key]

    def victims(self, entries: Iterable[CacheEntry]) -> Iterator[CacheEntry]:
        """Lowest priority first; ties (and untracked entries, at L) least recently used."""
        return iter(
            sorted(
                entries,
                key=lambda e: (self._priority.get(e.key, self._inflation), e.last_used),
            )
        )

    def _reprioritise(self, entry: CacheEntry) -> None:
        cost = max(entry.load_seconds, self.min_cost_s)
        value = self._frequency[entry.key] * cost / max(entry.nbytes, 1)
        self._priority[entry.key] = self._inflation + value


def make_policy(name: PolicyName) -> EvictionPolicy:
    """A fresh eviction policy for a host config's `eviction_policy` name."""
    if name == "lru":
        return LRUPolicy()
    if name == "gdsf":
        return GDSFPolicy()
    raise ValueError(f"unknown eviction policy {name!r}: use 'lru' or 'gdsf'")
