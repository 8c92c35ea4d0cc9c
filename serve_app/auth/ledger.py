"""Per-tenant request accounting over a recent window, mergeable across ingress replicas.

Every request that went through a tenant check is recorded under its principal's name
(tenant names come from config, plus `admin` and `anonymous`, so the set is bounded):
requests, successes, refusals (401/403), throttled (429), other errors, and latency.
`GET /v1/stats` shows one row per tenant; Prometheus gets `fleet_tenant_requests_total`.
"""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from collections.abc import Iterable
from typing import Any

from serve_app.observability.stats import LatencySketch, TenantStats


def outcome_of(status: int) -> str:
    """`ok`, `refused` (401/403), `throttled` (429) or `errors`."""
    if status < 400:
        return "ok"
    if status in (401, 403):
        return "refused"
    if status == 429:
        return "throttled"
    return "errors"


class TenantLedger:
    """Time slices of per-tenant counters and latency sketches of one replica."""

    def __init__(self, slice_s: float = 5.0, retention_s: float = 900.0) -> None:
        self.slice_s = slice_s
        self.retention_s = retention_s
        self._slices: dict[int, dict[str, dict[str, Any]]] = defaultdict(dict)
        self._lock = threading.Lock()

    def record(self, tenant: str, status: int, latency_ms: float) -> None:
        """Account one finished request of `tenant`."""
        slot = int(time.time() // self.slice_s)
        with self._lock:
            row = self._slices[slot].setdefault(
                tenant, {"ok": 0, "refused": 0, "throttled": 0, "errors": 0, "latency": {}}
            )
            row[outcome_of(status)] += 1
            sketch = LatencySketch(row["latency"])
            sketch.add(latency_ms)
            row["latency"] = sketch.buckets
            oldest = slot - int(self.retention_s // self.slice_s)
            for old in [s for s in self._slices if s < oldest]:
                del self._slices[old]

    def snapshot(self) -> dict[str, Any]:
        """The retained slices as JSON-able data (what peers merge)."""
        with self._lock:
            return {
                "slice_s": self.slice_s,
                "slices": {
                    str(slot): {
                        t: {**row, "latency": {str(k): v for k, v in row["latency"].items()}}
                        for t, row in rows.items()
                    }
                    for slot, rows in self._slices.items()
                },
            }


def summarise_tenants(
    snapshots: Iterable[dict[str, Any]], window_s: float, now: float | None = None
) -> list[TenantStats]:
    """Merge replica snapshots into one row per tenant over the last `window_s` seconds."""
    now = time.time() if now is None else now
    merged: dict[str, dict[str, Any]] = {}
    for snap in snapshots:
        slice_s = snap.get("slice_s", 5.0)
        for slot, rows in (snap.get("slices") or {}).items():
            if (int(slot) + 1) * slice_s < now - window_s:
                continue
            for tenant, row in rows.items():
                into = merged.setdefault(
                    tenant,
                    {
                        "ok": 0,
                        "refused": 0,
                        "throttled": 0,
                        "errors": 0,
                        "latency": LatencySketch(),
                    },
                )
                for name in ("ok", "refused", "throttled", "errors"):
                    into[name] += row[name]
                into["latency"].merge(LatencySketch.from_json(row["latency"]))
    out = []
    for tenant, row in sorted(merged.items()):
        sketch: LatencySketch = row["latency"]
        p50, p99 = sketch.quantile(0.5), sketch.quantile(0.99)
        out.append(
            TenantStats(
                tenant=tenant,
                requests=row["ok"] + row["refused"] + row["throttled"] + row["errors"],
                ok=row["ok"],
                refused=row["refused"],
                throttled=row["throttled"],
                errors=row["errors"],
                p50_ms=None if p50 is None else round(p50, 3),
                p99_ms=None if p99 is None else round(p99, 3),
            )
        )
    return out
