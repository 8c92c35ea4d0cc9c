"""Per-arm counters of alias splits and shadow copies, kept in memory by each ingress replica.

`GET /v1/routing` shows them next to the active routing, so an operator running a 90/10
split sees the traffic share, error count and latency of each arm (and of the shadow
candidate) without Prometheus. Keys come from the routing config, so they are bounded.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

from serve_app.stats import LatencySketch


@dataclass
class _Arm:
    requests: int = 0
    errors: int = 0
    dropped: int = 0
    latency: LatencySketch = field(default_factory=LatencySketch)


class ArmStats:
    """Requests, errors and latency per (alias, arm, role); role is `serve` or `shadow`."""

    def __init__(self) -> None:
        self._arms: dict[tuple[str, str, str], _Arm] = {}
        self._lock = threading.Lock()

    def record(self, alias: str, arm: str, role: str, ok: bool, latency_ms: float) -> None:
        """One finished request (or shadow copy) on an arm."""
        with self._lock:
            entry = self._arms.setdefault((alias, arm, role), _Arm())
            entry.requests += 1
            if ok:
                entry.latency.add(latency_ms)
            else:
                entry.errors += 1

    def dropped(self, alias: str, arm: str) -> None:
        """A shadow copy not sent because too many were in flight."""
        with self._lock:
            self._arms.setdefault((alias, arm, "shadow"), _Arm()).dropped += 1

    def reset(self) -> None:
        """Forget everything (the routing changed)."""
        with self._lock:
            self._arms.clear()

    def snapshot(self) -> list[dict[str, Any]]:
        """One row per (alias, arm, role) with share of the alias's served requests."""
        with self._lock:
            rows = [
                (key, arm.requests, arm.errors, arm.dropped, LatencySketch(arm.latency.buckets))
                for key, arm in self._arms.items()
            ]
        served: dict[str, int] = {}
        for (alias, _, role), requests, *_ in rows:
            if role == "serve":
                served[alias] = served.get(alias, 0) + requests
        out = []
        for (alias, arm, role), requests, errors, dropped, latency in sorted(
            rows, key=lambda r: r[0]
        ):
            total = served.get(alias, 0)
            out.append(
                {
                    "alias": alias,
                    "arm": arm,
                    "role": role,
                    "requests": requests,
                    "errors": errors,
                    "dropped": dropped,
                    "share": round(requests / total, 4) if role == "serve" and total else None,
                    "p50_ms": _rounded(latency.quantile(0.5)),
                    "p99_ms": _rounded(latency.quantile(0.99)),
                }
            )
        return out


def _rounded(ms: float | None) -> float | None:
    return None if ms is None else round(ms, 3)
