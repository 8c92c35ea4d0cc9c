"""Eviction policies: which idle models a full cache gives up first.

`ModelCache` delegates the *order* of eviction to a policy; the cache itself still decides
*whether* an entry may go (never while leased, never while pinned). A policy sees every
load, hit and eviction so it can keep its own priorities.

`LRUPolicy` (least recently used first) is the default: the cache keeps its entries in
recency order, so LRU needs no state of its own.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from serve_app.cache import CacheEntry


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
