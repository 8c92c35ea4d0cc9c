"""Offline replay of a request trace against a cache budget, and bounds on the offline optimum.

`simulate()` replays a trace of `TraceRequest(key, nbytes, load_seconds)` against a byte
budget (or a model count, like Ray's `@serve.multiplexed`) with an `EvictionPolicy`, the same
policy objects `ModelCache` uses, and counts misses and load-seconds. Requests are served one
at a time (no leases outlive a request), the way `ModelCache` sees a sequential client: on a
miss, room is made first (victims in the policy's order), then the model is loaded; a model
must be resident to be served, so there is no "bypass the cache" as in CDN caches.

`offline_bounds()` brackets the offline optimum OPT on the same trace (exact OPT is NP-hard
with variable sizes). It uses the interval formulation of Berger, Beckmann and
Harchol-Balter ("Practical Bounds on Optimal Caching with Variable Object Sizes",
SIGMETRICS 2018), adapted to forced admission: one variable per interval between two
consecutive requests of a model (1: kept resident over the interval, 0: evicted and loaded
again), and at every request time the requested model plus the kept intervals spanning that
time must fit in the budget. Its integer program is exactly OPT; so

- `lower` is the LP relaxation's value (FOO-L): no policy, online or offline, does better;
- `upper` is the cost of a feasible offline schedule: the better of the LP solution rounded
  down and greedily refilled (FOO-U style) and Belady's farthest-in-future with size-aware
  tie-breaking. OPT is at most this.

With equal sizes the constraint matrix is an interval matrix (totally unimodular), the LP is
integral and `lower == upper ==` Belady's MIN, which the unit tests check.
"""

from __future__ import annotations

import bisect
import math
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

from serve_app.cache.model_cache import CacheEntry
from serve_app.cache.policy import EvictionPolicy
from serve_app.planning.trace import TraceRequest, zipf_trace

# NOTE: traces live in the serving package (the capacity planner reads them too).
__all__ = [
    "OptimumBounds",
    "SimulationResult",
    "TraceRequest",
    "belady_size",
    "offline_bounds",
    "simulate",
    "zipf_trace",
]

Objective = Literal["misses", "load_seconds"]


@dataclass
class SimulationResult:
    """What a replay cost."""

    name: str
    requests: int
    misses: int = 0
    load_seconds: float = 0.0
    evictions: int = 0
    peak_bytes: int = 0
    peak_models: int = 0
    evicted_keys: list[str] = field(default_factory=list)
    resident_keys: list[str] = field(default_factory=list)

    @property
    def miss_ratio(self) -> float:
        """Misses per request."""
        return self.misses / self.requests if self.requests else 0.0

    def cost(self, objective: Objective) -> float:
        """The replay's misses or load-seconds."""
        return float(self.misses) if objective == "misses" else self.load_seconds


@dataclass(frozen=True)
class OptimumBounds:
    """OPT lies in [lower, upper] (misses or load-seconds, compulsory loads included)."""

    objective: Objective
    lower: float
    upper: float
    upper_method: str


@dataclass
class _SimModel:
    """The stand-in 'model' of a simulated entry (what `CacheEntry.model` holds)."""

    nbytes: int
    closed: bool = field(default=False)

    def close(self) -> None:
        self.closed = True


def simulate(
    trace: Sequence[TraceRequest],
    policy: EvictionPolicy,
    *,
    budget_bytes: int | None = None,
    max_models: int | None = None,
    name: str = "",
) -> SimulationResult:
    """Replay `trace` with `policy` under a byte budget and/or a model count.

    Args:
        trace: the requests, in order.
        policy: a fresh eviction policy (it keeps state across calls).
        budget_bytes: resident bytes never exceed this (None: no byte limit).
        max_models: resident models never exceed this (None: no count limit).
        name: label of the result.

    Raises:
        ValueError: no limit given, or a model larger than the byte budget.
    """
    if budget_bytes is None and max_models is None:
        raise ValueError("give budget_bytes, max_models or both")
    if max_models is not None and max_models < 1:
        raise ValueError("max_models must be at least 1")
    result = SimulationResult(name or policy.name, len(trace))
    entries: OrderedDict[str, CacheEntry[_SimModel]] = OrderedDict()
    resident = 0
    for now, request in enumerate(trace):
        clock = float(now)
        entry = entries.get(request.key)
        if entry is not None:
            entry.last_used = clock
            entry.hits += 1
            entries.move_to_end(request.key)
            policy.on_hit(entry)
            continue
        if budget_bytes is not None and request.nbytes > budget_bytes:
            raise ValueError(f"{request.key} ({request.nbytes} B) exceeds the budget")
        result.misses += 1
        result.load_seconds += request.load_seconds
        while _over(resident, len(entries), request.nbytes, budget_bytes, max_models):
            victim = next(iter(policy.victims(list(entries.values()))))
            del entries[victim.key]
            resident -= victim.nbytes
            result.evictions += 1
            result.evicted_keys.append(victim.key)
            policy.on_evict(victim)
        entry = CacheEntry(
            request.key,
            _SimModel(request.nbytes),
            request.nbytes,
            request.load_seconds,
            clock,
            clock,
        )
        entries[request.key] = entry
        resident += request.nbytes
        policy.on_load(entry)
        result.peak_bytes = max(result.peak_bytes, resident)
        result.peak_models = max(result.peak_models, len(entries))
    result.resident_keys = list(entries)
    return result


def _over(
    resident: int, count: int, nbytes: int, budget_bytes: int | None, max_models: int | None
) -> bool:
    """Whether one more model of `nbytes` would break the byte budget or the model count."""
    over_bytes = budget_bytes is not None and resident + nbytes > budget_bytes
    over_count = max_models is not None and count + 1 > max_models
    return over_bytes or over_count


# ---------------------------------------------------------------------- offline optimum
@dataclass(frozen=True)
class _Interval:
    obj: str
    start: int  # request index of the earlier request
    end: int  # request index of the next request of the same model
    nbytes: int
    weight: float  # what losing this interval costs: one miss, or the reload's seconds


def _weight(request: TraceRequest, objective: Objective) -> float:
    return 1.0 if objective == "misses" else request.load_seconds


def _intervals(
    trace: Sequence[TraceRequest], objective: Objective
) -> tuple[list[_Interval], float]:
    """Reuse intervals of the trace and the cost of its compulsory (first) loads."""
    last: dict[str, int] = {}
    intervals: list[_Interval] = []
    compulsory = 0.0
    for t, request in enumerate(trace):
        previous = last.get(request.key)
        if previous is None:
            compulsory += _weight(request, objective)
        else:
            intervals.append(
                _Interval(request.key, previous, t, request.nbytes, _weight(request, objective))
            )
        last[request.key] = t
    return intervals, compulsory


def belady_size(
    trace: Sequence[TraceRequest], budget_bytes: int, name: str = "belady-size"
) -> SimulationResult:
    """Farthest-in-future eviction (ties: the larger model first), forced admission.

    Optimal for equal sizes and unit costs (Belady's MIN); with variable sizes it is only a
    feasible offline schedule, i.e. an upper bound on OPT.
    """
    positions: dict[str, list[int]] = {}
    for t, request in enumerate(trace):
        positions.setdefault(request.key, []).append(t)

    def next_use(key: str, t: int) -> float:
        uses = positions[key]
        i = bisect.bisect_right(uses, t)
        return uses[i] if i < len(uses) else math.inf

    result = SimulationResult(name, len(trace))
    resident: dict[str, int] = {}
    used = 0
    for t, request in enumerate(trace):
        if request.key in resident:
            continue
        if request.nbytes > budget_bytes:
            raise ValueError(f"{request.key} ({request.nbytes} B) exceeds the budget")
        result.misses += 1
        result.load_seconds += request.load_seconds
        while used + request.nbytes > budget_bytes:
            victim = max(resident, key=lambda k: (next_use(k, t), resident[k]))
            used -= resident.pop(victim)
            result.evictions += 1
        resident[request.key] = request.nbytes
        used += request.nbytes
        result.peak_bytes = max(result.peak_bytes, used)
        result.peak_models = max(result.peak_models, len(resident))
    return result


def offline_bounds(
    trace: Sequence[TraceRequest], budget_bytes: int, objective: Objective = "misses"
) -> OptimumBounds:
    """Lower and upper bounds on the offline optimum's misses or load-seconds (see module).

    The LP is solved in its network form (rows differenced, as in FOO's min-cost flow):
    `y_j` = bytes of interval j kept, `g_t` = bytes of kept intervals that strictly span
    request t, bounded by the budget minus the size of the model requested at t, and
    `g_t - g_(t-1) = y_(interval starting at t-1) - y_(interval ending at t)`. That is
    O(requests) non-zeros, so traces of 10^4-10^5 requests solve in about a second.
    """
    import numpy as np
    from scipy.optimize import linprog
    from scipy.sparse import csr_matrix

    if any(r.nbytes > budget_bytes for r in trace):
        raise ValueError("a model of the trace exceeds the budget")
    intervals, compulsory = _intervals(trace, objective)
    belady_cost = belady_size(trace, budget_bytes).cost(objective)
    # An interval without a request inside it takes no room at any request: always kept.
    spans = [iv for iv in intervals if iv.end - iv.start >= 2]
    if not spans:
        return OptimumBounds(objective, compulsory, belady_cost, "belady-size")
    n, m = len(trace), len(spans)
    scale = float(budget_bytes)  # bytes in units of the budget keep the LP well conditioned
    # variables: y_0..y_(m-1), then g_0..g_(n-1)
    rows: list[int] = []
    cols: list[int] = []
    vals: list[float] = []
    for t in range(n):
        rows.append(t)
        cols.append(m + t)
        vals.append(1.0)
        if t > 0:
            rows.append(t)
            cols.append(m + t - 1)
            vals.append(-1.0)
    for j, iv in enumerate(spans):
        rows += [iv.start + 1, iv.end]
        cols += [j, j]
        vals += [-1.0, 1.0]
    a_eq = csr_matrix((vals, (rows, cols)), shape=(n, m + n))
    sizes = np.array([iv.nbytes for iv in spans], dtype=float) / scale
    weights = np.array([iv.weight for iv in spans])
    room_bytes = np.array([budget_bytes - r.nbytes for r in trace], dtype=float)
    room = room_bytes / scale
    bounds = [(0.0, s) for s in sizes] + [(0.0, r) for r in room]
    objective_row = np.concatenate([-weights / sizes, np.zeros(n)])
    solution = linprog(objective_row, A_eq=a_eq, b_eq=np.zeros(n), bounds=bounds, method="highs")
    if solution.status != 0:
        raise RuntimeError(f"offline LP failed: {solution.message}")
    x = np.clip(solution.x[:m] / sizes, 0.0, 1.0)
    lower = compulsory + float(weights @ (1.0 - x))
    kept = _round_and_refill(spans, x, room_bytes)
    rounded = compulsory + float(sum(iv.weight for iv, k in zip(spans, kept, strict=True) if not k))
    if rounded <= belady_cost:
        return OptimumBounds(objective, lower, rounded, "lp-rounded")
    return OptimumBounds(objective, lower, belady_cost, "belady-size")


def _round_and_refill(spans: list[_Interval], x: object, room: object) -> list[bool]:
    """Keep the intervals the LP keeps whole, then greedily add others that still fit."""
    import numpy as np

    x = np.asarray(x)
    slack = np.asarray(room, dtype=float).copy()
    kept = [False] * len(spans)
    order = sorted(range(len(spans)), key=lambda j: (-x[j], spans[j].end - spans[j].start))
    for j in order:
        iv = spans[j]
        window = slack[iv.start + 1 : iv.end]
        if window.min() >= iv.nbytes:
            window -= iv.nbytes
            kept[j] = True
    return kept
