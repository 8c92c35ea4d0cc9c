"""Per-arm counters of alias splits and shadow copies, kept in memory by each ingress replica.

`GET /v1/routing` shows them next to the active routing, so an operator running a 90/10
split sees the traffic share, error count and latency of each arm (and of the shadow
candidate) without Prometheus. Keys come from the routing config, so they are bounded.

With several ingress replicas each one publishes `export()` next to its stats snapshot, and
`snapshot(peers)` merges the exports whose `generation` (a digest of the aliases they
count for) matches its own: a replica that has not applied a new split yet is left out
instead of mixing the old split's counts into the new one's.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from serve_app.observability.stats import LatencySketch


@dataclass
class _Arm:
    requests: int = 0
    errors: int = 0
    dropped: int = 0
    latency: LatencySketch = field(default_factory=LatencySketch)


class ArmStats:
    """Requests, errors and latency per (alias, arm, role); role is `serve` or `shadow`."""

    def __init__(self, aliases: dict[str, Any] | None = None) -> None:
        self._arms: dict[tuple[str, str, str], _Arm] = {}
        self._lock = threading.Lock()
        self.generation = generation_of(aliases or {})

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

    def reset(self, aliases: dict[str, Any] | None = None) -> None:
        """Forget everything: the split changed to `aliases` (their JSON form)."""
        with self._lock:
            self._arms.clear()
            self.generation = generation_of(aliases or {})

    def export(self) -> dict[str, Any]:
        """This replica's raw counters as JSON, for its peers to merge."""
        with self._lock:
            return {
                "generation": self.generation,
                "rows": [
                    {
                        "key": list(key),
                        "requests": arm.requests,
                        "errors": arm.errors,
                        "dropped": arm.dropped,
                        "latency": arm.latency.to_json(),
                    }
                    for key, arm in self._arms.items()
                ],
            }

    def snapshot(self, peers: Iterable[dict[str, Any]] = ()) -> list[dict[str, Any]]:
        """One row per (alias, arm, role) with share of the alias's served requests,
        over this replica and the `peers`' exports counting for the same split."""
        merged: dict[tuple[str, str, str], _Arm] = {}
        for export in [self.export(), *peers]:
            if export.get("generation") != self.generation:
                continue
            for row in export["rows"]:
                entry = merged.setdefault(tuple(row["key"]), _Arm())  # type: ignore[arg-type]
                entry.requests += row["requests"]
                entry.errors += row["errors"]
                entry.dropped += row["dropped"]
                entry.latency.merge(LatencySketch.from_json(row["latency"]))
        rows = [
            (key, arm.requests, arm.errors, arm.dropped, arm.latency) for key, arm in merged.items()
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


def generation_of(aliases: dict[str, Any]) -> str:
    """A digest of the aliases' JSON: equal on every replica that applied the same split."""
    return hashlib.sha256(json.dumps(aliases, sort_keys=True).encode()).hexdigest()[:16]


def _rounded(ms: float | None) -> float | None:
    return None if ms is None else round(ms, 3)
