"""Every fleetserve metric, defined once, exported through Ray's metrics API.

Ray exports them on each node's metrics endpoint with a `ray_` prefix (so
`fleet_request_latency_ms` is scraped as `ray_fleet_request_latency_ms_bucket`), where
Prometheus and the Ray dashboard's metrics pages pick them up. Model labels are bounded:
`ModelLabels` gives the first `max_models` distinct model ids their own label value and
folds the rest into `__other__`, so a fleet of 100k models cannot explode the series count.
"""

from __future__ import annotations

import threading

from ray.util.metrics import Counter, Gauge, Histogram

from serve_app.cache.model_cache import CacheEvent

OTHER = "__other__"

# NOTE: milliseconds, ~1.5x apart from 0.1 ms to 2 min: the p99 of a sub-millisecond warm
# call and of a 20 s cold load both fall between close boundaries.
LATENCY_BUCKETS_MS = [
    0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1, 1.5, 2, 3, 5, 7.5, 10, 15, 20, 30, 50, 75, 100, 150,
    200, 300, 500, 750, 1000, 1500, 2000, 3000, 5000, 7500, 10000, 15000, 20000, 30000,
    45000, 60000, 120000,
]  # fmt: skip
BYTES_BUCKETS = [1e5, 1e6, 1e7, 3e7, 1e8, 3e8, 1e9, 3e9, 1e10]


class ModelLabels:
    """Bounded model/version label values: the first `max_models` ids keep their own."""

    def __init__(self, max_models: int = 200) -> None:
        self.max_models = max_models
        self._known: set[str] = set()
        self._lock = threading.Lock()

    def tags(self, model_id: str, version: str) -> dict[str, str]:
        """`{"model", "version"}` tags for this model, folded when over the cap."""
        with self._lock:
            if model_id not in self._known and len(self._known) < self.max_models:
                self._known.add(model_id)
            if model_id in self._known:
                return {"model": model_id, "version": version}
        return {"model": OTHER, "version": OTHER}


class IngressMetrics:
    """Request-level metrics, recorded by the ingress for every predict call."""

    def __init__(self, labels: ModelLabels) -> None:
        self.labels = labels
        self.requests = Counter(
            "fleet_requests_total",
            description="Predict requests by model, version and HTTP status code.",
            tag_keys=("model", "version", "status"),
        )
        self.latency = Histogram(
            "fleet_request_latency_ms",
            description="End-to-end predict latency in the ingress, labelled cold or warm.",
            boundaries=LATENCY_BUCKETS_MS,
            tag_keys=("model", "version", "cold"),
        )

    def observe(
        self, model_id: str, version: str, status: int, latency_ms: float, cold: bool | None
    ) -> None:
        """Record one finished request (latency only for successful ones)."""
        tags = self.labels.tags(model_id, version)
        self.requests.inc(1, tags={**tags, "status": str(status)})
        if cold is not None:
            self.latency.observe(latency_ms, tags={**tags, "cold": str(cold).lower()})


class HostMetrics:
    """Cache- and replica-level metrics, recorded by each model-host replica."""

    def __init__(
        self, labels: ModelLabels, replica: str, thrash_window_s: float = 60.0, node: str = ""
    ) -> None:
        """`node`: the readable name of the replica's Ray node (a tag of the replica gauges)."""
        self.labels = labels
        self.replica = {"replica": replica, "node": node}
        self.thrash_window_s = thrash_window_s
        model_tags = ("model", "version")
        self.hits = Counter(
            "fleet_cache_hits_total", "Requests served by a resident model.", model_tags
        )
        self.misses = Counter(
            "fleet_cache_misses_total", "Requests that needed a load.", model_tags
        )
        self.load_wait = Histogram(
            "fleet_load_wait_ms", "Time a request waited for its model to load.",
            LATENCY_BUCKETS_MS, model_tags,
        )  # fmt: skip
        self.load_duration = Histogram(
            "fleet_load_duration_ms", "Duration of one model load (fetch, verify, build).",
            LATENCY_BUCKETS_MS, model_tags,
        )  # fmt: skip
        self.loaded_bytes = Counter(
            "fleet_loaded_bytes_total", "Bytes made resident by loads (measured).", model_tags
        )
        self.evictions = Counter(
            "fleet_evictions_total", "Models evicted, by reason.", (*model_tags, "reason")
        )
        self.thrash = Counter(
            "fleet_thrash_total",
            "Requests for a model within the thrash window after its eviction here.",
            model_tags,
        )
        self.load_failures = Counter(
            "fleet_load_failures_total", "Failed loads, by error code.", (*model_tags, "code")
        )
        replica_tags = ("replica", "node")
        self.resident_bytes = Gauge(
            "fleet_replica_resident_bytes", "Measured bytes of resident models.", replica_tags
        )
        self.budget_bytes = Gauge("fleet_replica_budget_bytes", "Memory budget.", replica_tags)
        self.models = Gauge("fleet_replica_models", "Resident models.", replica_tags)
        self._evicted_at: dict[str, float] = {}

    def on_event(self, event: CacheEvent, now: float) -> None:
        """Record a cache event (wired to ModelCache's `on_event`)."""
        model_id, _, version = event.key.partition("@")
        tags = self.labels.tags(model_id, version)
        if event.kind == "hit":
            self.hits.inc(1, tags=tags)
        elif event.kind == "miss":
            self.misses.inc(1, tags=tags)
            evicted = self._evicted_at.pop(event.key, None)
            if evicted is not None and now - evicted <= self.thrash_window_s:
                self.thrash.inc(1, tags=tags)
        elif event.kind == "load":
            self.load_duration.observe(event.seconds * 1000, tags=tags)
            self.loaded_bytes.inc(event.nbytes, tags=tags)
        elif event.kind == "load_failed":
            self.load_failures.inc(1, tags={**tags, "code": event.reason})
        elif event.kind == "evict":
            self.evictions.inc(1, tags={**tags, "reason": event.reason})
            self._evicted_at[event.key] = now

    def observe_wait(self, model_id: str, version: str, wait_ms: float) -> None:
        """Record how long a cold request waited for its load."""
        self.load_wait.observe(wait_ms, tags=self.labels.tags(model_id, version))

    def set_residency(self, resident_bytes: int, budget_bytes: int, models: int) -> None:
        """Update the per-replica gauges."""
        self.resident_bytes.set(resident_bytes, tags=self.replica)
        self.budget_bytes.set(budget_bytes, tags=self.replica)
        self.models.set(models, tags=self.replica)


class ArmMetrics:
    """Per-arm metrics of alias splits and shadow copies (labels come from the routing
    config, so they are bounded by it; `role` is `serve` or `shadow`)."""

    def __init__(self) -> None:
        self.requests = Counter(
            "fleet_arm_requests_total",
            description="Requests per alias arm, by role (serve/shadow) and outcome.",
            tag_keys=("alias", "arm", "role", "outcome"),
        )
        self.latency = Histogram(
            "fleet_arm_latency_ms",
            description="Latency per alias arm and role (shadow: the copy's own latency).",
            boundaries=LATENCY_BUCKETS_MS,
            tag_keys=("alias", "arm", "role"),
        )

    def observe(self, alias: str, arm: str, role: str, outcome: str, latency_ms: float) -> None:
        """One request on an arm; `outcome` is `ok`, `error` or `dropped`."""
        tags = {"alias": alias, "arm": arm, "role": role}
        self.requests.inc(1, tags={**tags, "outcome": outcome})
        if outcome == "ok":
            self.latency.observe(latency_ms, tags=tags)


class TenantMetrics:
    """Per-tenant request counts and latency (tenant names come from config: bounded)."""

    def __init__(self) -> None:
        self.requests = Counter(
            "fleet_tenant_requests_total",
            description="Inference requests by tenant and outcome (ok, refused, throttled, "
            "errors).",
            tag_keys=("tenant", "outcome"),
        )
        self.latency = Histogram(
            "fleet_tenant_latency_ms",
            description="Latency of a tenant's successful inference requests in the ingress.",
            boundaries=LATENCY_BUCKETS_MS,
            tag_keys=("tenant",),
        )

    def observe(self, tenant: str, outcome: str, latency_ms: float) -> None:
        """Record one finished request of `tenant`."""
        self.requests.inc(1, tags={"tenant": tenant, "outcome": outcome})
        if outcome == "ok":
            self.latency.observe(latency_ms, tags={"tenant": tenant})
