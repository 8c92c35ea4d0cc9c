"""The host-RAM tier: verified file buffers of recently loaded versions, kept in host memory
under their own byte budget (least recently used dropped first).

It is meant for GPU replicas. There the model cache's budget is device memory, and a model
evicted from the device would otherwise come back from the disk tier or S3 (read, hash,
copy). With the tier, its weights are still in host RAM, already verified, and a reload is
one host-to-device copy plus the module build. A version enters the tier when it is loaded
and stays until newer loads push it out, whether or not it is still on the device: host
RAM on GPU machines is usually many times the device's memory (`host.ram_cache_bytes`).

On a CPU replica a resident model's tensors are zero-copy views of these same buffers, so
while it is resident the tier costs nothing extra; after its eviction the tier keeps its
bytes (counted against `ram_cache_bytes`, not the cache's `memory_budget`). Off by default.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

from serve_app.storage.fetch import Buffer


@dataclass
class RamTierStats:
    hits: int = 0
    misses: int = 0
    evictions: int = 0


class RamTier:
    """Buffers by version key, LRU by bytes; safe to use from several load threads."""

    def __init__(self, budget_bytes: int) -> None:
        self.budget_bytes = budget_bytes
        self.stats = RamTierStats()
        self._entries: OrderedDict[str, tuple[dict[str, Buffer], int]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, key: str) -> dict[str, Buffer] | None:
        """The buffers of version `key` (path -> buffer), now most recently used; None if
        the tier does not hold it."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                self.stats.misses += 1
                return None
            self._entries.move_to_end(key)
            self.stats.hits += 1
            return dict(entry[0])

    def __contains__(self, key: object) -> bool:
        """Whether the tier holds version `key` (no hit counted, no LRU change)."""
        with self._lock:
            return key in self._entries

    def put(self, key: str, buffers: dict[str, Buffer]) -> bool:
        """Hold `buffers` (verified files of version `key`), dropping least recently used
        versions until they fit; False, holding nothing, if they exceed the whole budget."""
        size = sum(len(b) for b in buffers.values())
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self._bytes -= old[1]
            if size > self.budget_bytes:
                return False
            while self._bytes + size > self.budget_bytes:
                _, (_, dropped) = self._entries.popitem(last=False)
                self._bytes -= dropped
                self.stats.evictions += 1
            self._entries[key] = (dict(buffers), size)
            self._bytes += size
            return True

    def status(self) -> dict[str, int | list[str]]:
        """Budget, bytes, held versions and counters (for a replica's status)."""
        with self._lock:
            return {
                "budget_bytes": self.budget_bytes,
                "bytes": self._bytes,
                "models": list(self._entries),
                "hits": self.stats.hits,
                "misses": self.stats.misses,
                "evictions": self.stats.evictions,
            }
