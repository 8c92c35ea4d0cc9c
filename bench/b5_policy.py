"""B5: cache-policy efficiency: LRU, GDSF and Ray's count-based LRU vs the offline optimum.

Offline replay (bench/cache_simulation.py, the same policy objects ModelCache uses) of
seeded traces over the demo fleet's real sizes:

- catalogue: the demo fleet of `fleetserve up --count N` (minilm-embed, 4 text classifiers,
  N fraud MLPs; sizes measured from the files devstack/demo_fleet.py writes). N defaults to 500,
  the smallest round count for which the largest model (text-clf-toxicity, 216 MB) fits in
  10% of the fleet's bytes: with the default 50 it would be a 507 at every budget tried;
- load cost of a model: FIXED_S + bytes / BYTES_PER_S, fitted to the replica's measured
  cold loads in docs/benchmarks.md (fraud 18.9 MB ~0.094 s, minilm 91.6 MB ~0.37 s);
- traces: Zipf alpha 0.7 / 0.9 / 1.1 (popularity rank order shuffled per seed), budgets
  10 / 20 / 30% of the fleet's bytes; plus, to look for regressions, the same Zipf with all
  sizes equal, a popularity shift half way and periodic scans of one-off models;
- offline optimum: `offline_bounds` brackets OPT between the LP relaxation (FOO-L, a lower
  bound: no policy does better) and the best feasible offline schedule found (LP rounded
  and refilled, or size-aware Belady). Ratios "x/opt" divide by the LOWER bound, so they
  overstate the true ratio to OPT, never understate it;
- Ray's `@serve.multiplexed` LRU has a model count and no byte budget. It runs with
  k = budget / mean model bytes (what fills the budget on average; peak bytes over the
  budget are reported) and with Ray's default k = 3;
- a reference that no real policy has: `oracle-static`, which knows each model's request
  count over the whole trace and keeps the highest count x cost / bytes (the best online
  policy under independent requests with known popularity). It shows how much of the gap
  to OPT is the price of not seeing the future rather than a weakness of a policy.

Run: `python -m bench.b5_policy [--runs 5]` (medians over runs, one seed per run).
Writes bench/results/b5_policy.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.cache_simulation import (
    OptimumBounds,
    SimulationResult,
    TraceRequest,
    offline_bounds,
    simulate,
    zipf_trace,
)
from serve_app.cache.model_cache import CacheEntry
from serve_app.cache.policy import GDSFPolicy, LRUPolicy

FIXED_S = 0.022  # seconds a load costs beyond moving bytes (fit: see module docstring)
BYTES_PER_S = 263e6  # effective load rate inside a replica (fetch + verify + build)
RAY_DEFAULT_MODELS = 3  # @serve.multiplexed(max_num_models_per_replica=3)
GOAL_VS_OPT = 1.15
GOAL_COST_VS_LRU = 0.8
NO_REGRESSION = 1.02  # reference/performance.md: never more than 1.02x LRU's load-seconds

Model = tuple[str, int, float]  # key, resident bytes, load seconds


@dataclass(frozen=True)
class Cell:
    """One trace family at one budget."""

    kind: str  # zipf | equal | shift | scan
    alpha: float
    budget_pct: int

    @property
    def name(self) -> str:
        prefix = {"zipf": "zipf", "equal": "equal-size zipf"}
        label = f"{prefix.get(self.kind, self.kind + ' zipf')}{self.alpha}"
        return f"{label} budget{self.budget_pct}%"


CELLS = [
    *(Cell("zipf", a, b) for a in (0.7, 0.9, 1.1) for b in (10, 20, 30)),
    *(Cell("equal", 0.9, b) for b in (10, 20, 30)),
    Cell("shift", 0.9, 20),
    Cell("drift", 0.9, 20),
    Cell("drift", 1.1, 30),
    Cell("scan", 0.9, 20),
]


class StaticOracle:
    """Evicts the lowest known `count x cost / bytes` first (popularity from the future)."""

    name = "oracle-static"

    def __init__(self, trace: list[TraceRequest]) -> None:
        counts = Counter(r.key for r in trace)
        self._value = {r.key: counts[r.key] * r.load_seconds / r.nbytes for r in trace}

    def on_load(self, entry: CacheEntry) -> None:
        """Static priorities: nothing to learn."""

    def on_hit(self, entry: CacheEntry) -> None:
        """Static priorities: nothing to learn."""

    def on_evict(self, entry: CacheEntry) -> None:
        """Static priorities: nothing to learn."""

    def victims(self, entries: Iterable[CacheEntry]) -> Iterator[CacheEntry]:
        return iter(sorted(entries, key=lambda e: (self._value[e.key], e.last_used)))


def load_cost(nbytes: int, fixed_s: float, bytes_per_s: float) -> float:
    """Modelled seconds to load a model of `nbytes`."""
    return fixed_s + nbytes / bytes_per_s


def fleet_models(count: int, fixed_s: float, bytes_per_s: float) -> list[Model]:
    """The demo fleet's models with their real weight bytes and modelled load costs."""
    from devstack.demo_fleet import (
        EMBEDDER_ID,
        TEXT_CLASSIFIERS,
        fraud_model_ids,
        fraud_spec,
        minilm_dir,
        write_text_classifier,
    )
    from serve_app.loading.architectures import build_mlp

    sizes: dict[str, int] = {
        EMBEDDER_ID: sum(f.stat().st_size for f in minilm_dir().glob("*.safetensors"))
    }
    with tempfile.TemporaryDirectory(prefix="b5-") as tmp:
        for spec in TEXT_CLASSIFIERS:
            folder = write_text_classifier(Path(tmp) / spec.model_id, spec)
            sizes[spec.model_id] = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    for i, model_id in enumerate(fraud_model_ids(count)):
        module = build_mlp(fraud_spec(i))
        sizes[model_id] = sum(p.numel() * p.element_size() for p in module.parameters())
    return [(k, n, load_cost(n, fixed_s, bytes_per_s)) for k, n in sizes.items()]


def make_trace(
    cell: Cell, models: list[Model], length: int, seed: int, fixed_s: float, rate: float
) -> list[TraceRequest]:
    """The cell's trace for one seed."""
    if cell.kind == "equal":
        mean = round(statistics.fmean(n for _, n, _ in models))
        same = [(k, mean, load_cost(mean, fixed_s, rate)) for k, _, _ in models]
        return zipf_trace(same, cell.alpha, length, seed)
    if cell.kind == "shift":  # the popularity order is reshuffled half way
        half = length // 2
        return zipf_trace(models, cell.alpha, half, seed) + zipf_trace(
            models, cell.alpha, length - half, seed + 7919
        )
    if cell.kind == "drift":  # every 100 requests the ranking rotates by 5: models fade out
        ranked = list(models)
        random.Random(seed).shuffle(ranked)
        trace = []
        for start in range(0, length, 100):
            shift = (start // 100) * 5 % len(ranked)
            rotated = ranked[shift:] + ranked[:shift]
            weights = [(rank + 1) ** -cell.alpha for rank in range(len(rotated))]
            picks = random.Random(seed * 1000 + start).choices(
                rotated, weights=weights, k=min(100, length - start)
            )
            trace += [TraceRequest(*m) for m in picks]
        return trace
    trace = zipf_trace(models, cell.alpha, length, seed)
    if cell.kind == "scan":  # every 1000 requests, 50 one-off requests of random models
        rng = random.Random(seed + 1)
        scanned: list[TraceRequest] = []
        for start in range(0, length, 1000):
            scanned += trace[start : start + 1000]
            scanned += [TraceRequest(*m) for m in rng.sample(models, 50)]
        return scanned
    return trace


def run_cell(
    cell: Cell, models: list[Model], length: int, seed: int, fixed_s: float, rate: float
) -> dict[str, Any]:
    """Replay one trace with every policy and bound its optimum."""
    trace = make_trace(cell, models, length, seed, fixed_s, rate)
    catalogue = {r.key: r.nbytes for r in trace}
    total = sum(n for _, n, _ in models) if cell.kind != "equal" else sum(catalogue.values())
    budget = int(total * cell.budget_pct / 100)
    mean_bytes = statistics.fmean(n for _, n, _ in models)
    k_fill = max(1, round(budget / mean_bytes))
    results: list[SimulationResult] = [
        simulate(trace, LRUPolicy(), budget_bytes=budget, name="lru"),
        simulate(trace, GDSFPolicy(), budget_bytes=budget, name="gdsf"),
        simulate(trace, LRUPolicy(), max_models=k_fill, name="ray-lru-fill"),
        simulate(trace, LRUPolicy(), max_models=RAY_DEFAULT_MODELS, name="ray-lru-3"),
        simulate(trace, StaticOracle(trace), budget_bytes=budget),
    ]
    bounds: dict[str, OptimumBounds] = {
        objective: offline_bounds(trace, budget, objective)
        for objective in ("misses", "load_seconds")
    }
    return {
        "seed": seed,
        "requests": len(trace),
        "budget_bytes": budget,
        "compulsory_misses": len(catalogue),
        "ray_fill_k": k_fill,
        "opt": {
            o: {"lower": b.lower, "upper": b.upper, "upper_method": b.upper_method}
            for o, b in bounds.items()
        },
        "policies": {
            r.name: {
                "misses": r.misses,
                "load_seconds": round(r.load_seconds, 4),
                "evictions": r.evictions,
                "peak_bytes": r.peak_bytes,
                "peak_models": r.peak_models,
            }
            for r in results
        },
    }


def ratios(sample: dict[str, Any]) -> dict[str, float]:
    """The ratios of one sample (misses / OPT bounds, load-seconds vs LRU and OPT)."""
    opt_m, opt_s = sample["opt"]["misses"], sample["opt"]["load_seconds"]
    lru = sample["policies"]["lru"]
    out: dict[str, float] = {}
    for name, p in sample["policies"].items():
        out[f"{name} misses/opt"] = p["misses"] / opt_m["lower"]
        out[f"{name} misses/opt-upper"] = p["misses"] / opt_m["upper"]
        out[f"{name} load-s/opt"] = p["load_seconds"] / opt_s["lower"]
        out[f"{name} load-s/lru"] = p["load_seconds"] / lru["load_seconds"]
        out[f"{name} misses/lru"] = p["misses"] / lru["misses"]
        out[f"{name} peak/budget"] = p["peak_bytes"] / sample["budget_bytes"]
    out["opt misses upper/lower"] = opt_m["upper"] / opt_m["lower"]
    out["opt load-s upper/lower"] = opt_s["upper"] / opt_s["lower"]
    return out


def markdown(summary: dict[str, Any]) -> str:
    """The docs/benchmarks.md table of a run (medians over its seeds)."""
    head = (
        "| trace | LRU misses/OPT | GDSF misses/OPT | oracle misses/OPT | GDSF load-s/LRU "
        "| GDSF load-s/OPT | Ray k=fill load-s/LRU (peak/budget) | Ray k=3 load-s/LRU |\n"
        "|---|---|---|---|---|---|---|---|\n"
    )
    rows = []
    for name, cell in summary["cells"].items():
        m = cell["medians"]
        k = cell["samples"][0]["ray_fill_k"]
        rows.append(
            f"| {name} | {m['lru misses/opt']:.2f} | {m['gdsf misses/opt']:.2f} "
            f"| {m['oracle-static misses/opt']:.2f} | **{m['gdsf load-s/lru']:.2f}** "
            f"(max {cell['max']['gdsf load-s/lru']:.2f}) | {m['gdsf load-s/opt']:.2f} "
            f"| {m['ray-lru-fill load-s/lru']:.2f} (k={k}, {m['ray-lru-fill peak/budget']:.2f}) "
            f"| {m['ray-lru-3 load-s/lru']:.2f} |"
        )
    return head + "\n".join(rows)


def verdict(value: float, goal: float) -> str:
    return "PASS" if value <= goal else f"MISS by {100 * (value / goal - 1):.1f}%"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=5, help="seeds per cell (medians)")
    parser.add_argument("--requests", type=int, default=10_000, help="requests per trace")
    parser.add_argument("--count", type=int, default=500, help="fraud models in the fleet")
    parser.add_argument("--fixed-s", type=float, default=FIXED_S)
    parser.add_argument("--bytes-per-s", type=float, default=BYTES_PER_S)
    parser.add_argument("--seed", type=int, default=20261201)
    parser.add_argument("--out", default="bench/results/b5_policy.json")
    parser.add_argument("--markdown", action="store_true", help="also print the docs table")
    args = parser.parse_args()
    started = time.perf_counter()

    print(f"B5: measuring the demo fleet's sizes (count {args.count})...", file=sys.stderr)
    models = fleet_models(args.count, args.fixed_s, args.bytes_per_s)
    fleet_bytes = sum(n for _, n, _ in models)
    largest = max(n for _, n, _ in models)
    smallest_budget = fleet_bytes * min(c.budget_pct for c in CELLS) / 100
    if largest > smallest_budget:
        sys.exit(f"the largest model ({largest} B) exceeds the smallest budget: raise --count")
    print(
        f"B5: {len(models)} models, {fleet_bytes / 1e6:.0f} MB, largest {largest / 1e6:.0f} MB; "
        f"{len(CELLS)} cells x {args.runs} runs x {args.requests} requests",
        file=sys.stderr,
    )
    cells: dict[str, Any] = {}
    lines: list[str] = []
    worse_than_lru: list[str] = []
    for cell in CELLS:
        samples = []
        for run in range(args.runs):
            t0 = time.perf_counter()
            sample = run_cell(
                cell, models, args.requests, args.seed + run, args.fixed_s, args.bytes_per_s
            )
            samples.append(sample)
            r = ratios(sample)
            print(
                f"  {cell.name} run {run + 1}/{args.runs}: "
                f"lru {r['lru misses/opt']:.3f} gdsf {r['gdsf misses/opt']:.3f} misses/opt, "
                f"gdsf load-s/lru {r['gdsf load-s/lru']:.3f} ({time.perf_counter() - t0:.1f}s)",
                file=sys.stderr,
            )
            gdsf, lru = sample["policies"]["gdsf"], sample["policies"]["lru"]
            if gdsf["load_seconds"] > lru["load_seconds"] or gdsf["misses"] > lru["misses"]:
                worse_than_lru.append(f"{cell.name} seed {sample['seed']}")
        per_sample = [ratios(s) for s in samples]
        medians = {k: round(statistics.median(r[k] for r in per_sample), 4) for k in per_sample[0]}
        cells[cell.name] = {
            "cell": cell.__dict__,
            "samples": samples,
            "medians": medians,
            "max": {k: round(max(r[k] for r in per_sample), 4) for k in per_sample[0]},
        }
        for policy in ("lru", "gdsf"):
            value = medians[f"{policy} misses/opt"]
            lines.append(
                f"B5 {cell.name} {policy} misses/opt = {value:.2f} "
                f"(goal <= {GOAL_VS_OPT}) {verdict(value, GOAL_VS_OPT)}"
            )
        value = medians["gdsf load-s/lru"]
        goal = GOAL_COST_VS_LRU if cell.kind == "zipf" else NO_REGRESSION
        lines.append(
            f"B5 {cell.name} gdsf load-s/lru = {value:.2f} (goal <= {goal}) {verdict(value, goal)}"
        )
    default = "gdsf" if not worse_than_lru else "lru"
    summary = {
        "benchmark": "b5_policy",
        "machine": {
            "platform": platform.platform(),
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
        },
        "timestamp": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "args": vars(args),
        "fleet": {"models": len(models), "bytes": fleet_bytes, "largest_bytes": largest},
        "goals": {
            "misses/opt": GOAL_VS_OPT,
            "gdsf load-s/lru (zipf)": GOAL_COST_VS_LRU,
            "gdsf load-s/lru (other traces)": NO_REGRESSION,
        },
        "cells": cells,
        "gdsf_worse_than_lru": worse_than_lru,
        "default_policy": default,
        "seconds": round(time.perf_counter() - started, 1),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(summary, indent=1))
    for line in lines:
        print(line)
    print(
        f"B5 gdsf worse than lru (misses or load-seconds) on {len(worse_than_lru)} of "
        f"{len(CELLS) * args.runs} traces -> default policy: {default}"
    )
    if args.markdown:
        print(markdown(summary))
    print(f"B5 wrote {args.out} in {summary['seconds']}s", file=sys.stderr)


if __name__ == "__main__":
    main()
