"""Per-model request statistics over a recent window, mergeable across replicas.

Each ingress replica records every request in a `StatsRecorder`: time slices of
`slice_s` seconds, each with per-model counters and `LatencySketch`es (log-bucketed
histograms with ~1% relative error, so quantiles from several replicas merge exactly).
`snapshot()` serialises the slices; `summarise()` merges snapshots from all replicas into
one row per model: requests, errors, hit rate, cold starts, p50/p95/p99 (overall and warm)
and the p50 of the time cold requests waited for a load.
"""

from __future__ import annotations

import math
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ConfigDict

GAMMA = 1.02  # bucket width ratio: quantiles are within ~1% of the true value
_LOG_GAMMA = math.log(GAMMA)
_MIN_MS = 1e-3


class LatencySketch:
    """A log-bucketed histogram of milliseconds; mergeable; quantiles within ~1%."""

    def __init__(self, buckets: dict[int, int] | None = None) -> None:
        self.buckets: dict[int, int] = dict(buckets or {})

    @property
    def count(self) -> int:
        """Number of samples."""
        return sum(self.buckets.values())

    def add(self, ms: float) -> None:
        """Record one latency in milliseconds."""
        index = math.ceil(math.log(max(ms, _MIN_MS)) / _LOG_GAMMA)
        self.buckets[index] = self.buckets.get(index, 0) + 1

    def merge(self, other: LatencySketch) -> None:
        """Add `other`'s samples to this sketch."""
        for index, n in other.buckets.items():
            self.buckets[index] = self.buckets.get(index, 0) + n

    def quantile(self, q: float) -> float | None:
        """The q-quantile (0..1) in ms, or None without samples (nearest-rank)."""
        total = self.count
        if total == 0:
            return None
        rank = max(1, math.ceil(q * total))
        seen = 0
        for index in sorted(self.buckets):
            seen += self.buckets[index]
            if seen >= rank:
                # the bucket (gamma^(i-1), gamma^i]: report its midpoint in log space
                return GAMMA ** (index - 0.5)
        return None  # pragma: no cover - rank <= total always hits a bucket

    def to_json(self) -> dict[str, int]:
        return {str(k): v for k, v in self.buckets.items()}

    @classmethod
    def from_json(cls, data: dict[str, int]) -> LatencySketch:
        return cls({int(k): v for k, v in data.items()})


@dataclass
class ModelSlice:
    """One model's traffic in one time slice."""

    requests: int = 0
    errors: int = 0
    hits: int = 0
    cold: int = 0
    latency: LatencySketch = field(default_factory=LatencySketch)
    warm_latency: LatencySketch = field(default_factory=LatencySketch)
    load_wait: LatencySketch = field(default_factory=LatencySketch)

    def merge(self, other: ModelSlice) -> None:
        self.requests += other.requests
        self.errors += other.errors
        self.hits += other.hits
        self.cold += other.cold
        self.latency.merge(other.latency)
        self.warm_latency.merge(other.warm_latency)
        self.load_wait.merge(other.load_wait)

    def to_json(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "errors": self.errors,
            "hits": self.hits,
            "cold": self.cold,
            "latency": self.latency.to_json(),
            "warm_latency": self.warm_latency.to_json(),
            "load_wait": self.load_wait.to_json(),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ModelSlice:
        return cls(
            requests=data["requests"],
            errors=data["errors"],
            hits=data["hits"],
            cold=data["cold"],
            latency=LatencySketch.from_json(data["latency"]),
            warm_latency=LatencySketch.from_json(data["warm_latency"]),
            load_wait=LatencySketch.from_json(data["load_wait"]),
        )


class ModelStats(BaseModel):
    """One row of `GET /v1/stats`."""

    model_config = ConfigDict(protected_namespaces=())

    model_id: str
    version: str
    requests: int
    errors: int
    hit_rate: float | None
    cold_starts: int
    p50_ms: float | None
    p95_ms: float | None
    p99_ms: float | None
    warm_p50_ms: float | None
    warm_p95_ms: float | None
    warm_p99_ms: float | None
    load_p50_ms: float | None


class TenantStats(BaseModel):
    """One tenant's row of `GET /v1/stats` (`tenants`, with tenants configured)."""

    tenant: str
    requests: int
    ok: int
    refused: int
    throttled: int
    errors: int
    p50_ms: float | None
    p99_ms: float | None


class StatsReport(BaseModel):
    """`GET /v1/stats`: per-model rows over the last `window_s` seconds (and per-tenant
    rows when tenants are configured)."""

    window_s: float
    replicas: int
    models: list[ModelStats]
    tenants: list[TenantStats] | None = None


class StatsRecorder:
    """Thread-safe per-model recorder of one replica (see module docstring)."""

    def __init__(
        self,
        slice_s: float = 5.0,
        retention_s: float = 900.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.slice_s = slice_s
        self.retention_s = retention_s
        self._clock = clock
        self._slices: dict[int, dict[str, ModelSlice]] = defaultdict(dict)
        self._lock = threading.Lock()

    def record(
        self,
        model_id: str,
        latency_ms: float,
        ok: bool,
        resident: bool | None = None,
        load_wait_ms: float = 0.0,
    ) -> None:
        """Record one finished request of `model_id@version` (or a bare id for errors that
        happen before a version is resolved); only successes carry latency."""
        slot = int(self._clock() // self.slice_s)
        with self._lock:
            entry = self._slices[slot].setdefault(model_id, ModelSlice())
            entry.requests += 1
            if not ok:
                entry.errors += 1
            else:
                entry.latency.add(latency_ms)
                if resident:
                    entry.hits += 1
                    entry.warm_latency.add(latency_ms)
                else:
                    entry.cold += 1
                    entry.load_wait.add(load_wait_ms)
            self._prune(slot)

    def _prune(self, slot: int) -> None:
        oldest = slot - int(self.retention_s // self.slice_s)
        for old in [s for s in self._slices if s < oldest]:
            del self._slices[old]

    def snapshot(self) -> dict[str, Any]:
        """All retained slices as JSON-able data: `{"slice_s", "slices": {slot: {model: ...}}}`."""
        with self._lock:
            return {
                "slice_s": self.slice_s,
                "slices": {
                    str(slot): {m: s.to_json() for m, s in models.items()}
                    for slot, models in self._slices.items()
                },
            }


def summarise(
    snapshots: Iterable[dict[str, Any]], window_s: float, now: float | None = None
) -> StatsReport:
    """Merge replica snapshots into per-model rows over the last `window_s` seconds."""
    now = time.time() if now is None else now
    merged: dict[str, ModelSlice] = {}
    count = 0
    for snap in snapshots:
        count += 1
        slice_s = snap["slice_s"]
        first = int((now - window_s) // slice_s)
        for slot, models in snap["slices"].items():
            if int(slot) < first:
                continue
            for model_id, data in models.items():
                merged.setdefault(model_id, ModelSlice()).merge(ModelSlice.from_json(data))
    rows = [_row(key, s) for key, s in sorted(merged.items())]
    return StatsReport(window_s=window_s, replicas=count, models=rows)


def _row(key: str, s: ModelSlice) -> ModelStats:
    model_id, _, version = key.partition("@")
    ok = s.requests - s.errors

    def q(sketch: LatencySketch, p: float) -> float | None:
        value = sketch.quantile(p)
        return None if value is None else round(value, 3)

    return ModelStats(
        model_id=model_id,
        version=version,
        requests=s.requests,
        errors=s.errors,
        hit_rate=round(s.hits / ok, 4) if ok else None,
        cold_starts=s.cold,
        p50_ms=q(s.latency, 0.50),
        p95_ms=q(s.latency, 0.95),
        p99_ms=q(s.latency, 0.99),
        warm_p50_ms=q(s.warm_latency, 0.50),
        warm_p95_ms=q(s.warm_latency, 0.95),
        warm_p99_ms=q(s.warm_latency, 0.99),
        load_p50_ms=q(s.load_wait, 0.50),
    )
