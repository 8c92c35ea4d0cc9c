"""`fleetserve plan`: the capacity planner's command (see serve_app.planning.capacity).

It replays an access log or a Zipf trace over the registry's real model sizes through the
real cache and router code and prints hit rate, cold starts, load seconds, the memory a
target hit rate needs and the consolidation ratio.
"""

from __future__ import annotations

import argparse
import functools
import json
from collections.abc import Callable
from pathlib import Path

from serve_app.config import load_config, parse_bytes
from serve_app.storage.store import ModelStore

StoreFromArgs = Callable[[argparse.Namespace], ModelStore]


def _csv(kind):  # type: ignore[no-untyped-def]
    def parse(text: str) -> list:
        return [kind(part) for part in text.split(",") if part.strip()]

    return parse


def cmd_plan(args: argparse.Namespace, store_from_args: StoreFromArgs) -> int:
    """`fleetserve plan`: replay a trace, print the plan (text or --json)."""
    import yaml

    from serve_app.planning.capacity import format_plan, plan
    from serve_app.planning.pools import format_pools, overall_hit_rate, replay_config, routing_of
    from serve_app.planning.trace import (
        LoadTimeModel,
        latest_manifests,
        read_access_log,
        registry_models,
        trace_from_access_log,
        zipf_trace,
    )
    from serve_app.storage.registry import Registry

    registry = Registry(store_from_args(args))
    registry.refresh()
    load_time = LoadTimeModel(args.load_fixed_s, args.load_mb_per_s * 1e6)
    if args.access_log:
        lines: list[str] = []
        for path in args.access_log:
            lines += Path(path).read_text(errors="replace").splitlines()
        events = read_access_log(lines)
        manifests = {key: registry.resolve(*key.split("@", 1)) for key in {e.key for e in events}}
        sizes = {key: m.weight_bytes for key, m in manifests.items()}
        trace = trace_from_access_log(events, sizes, load_time)
    else:
        latest = latest_manifests(registry)
        manifests = {m.key: m for m in latest}
        trace = zipf_trace(
            registry_models(latest, load_time), args.zipf, args.requests, args.seed, args.rate
        )
    if args.pools_from_config:
        serve_config = yaml.safe_load(Path(args.config).read_text())
        budget = args.budget[0] if args.budget else None
        plans = replay_config(
            trace, load_config(args.config), routing_of(serve_config), manifests, budget
        )
        if args.json:
            report = {
                "hit_rate": round(overall_hit_rate(plans), 4),
                "pools": [{"pool": p.pool, **p.result.as_dict()} for p in plans],
            }
            print(json.dumps(report, indent=2))
        else:
            print(format_pools(plans))
        return 0
    report = plan(
        trace,
        args.replicas,
        args.budget or [2**30],
        args.target_hit_rate,
        args.policy,
        args.endpoint_bytes,
    )
    print(json.dumps(report.as_dict(), indent=2) if args.json else format_plan(report))
    return 0


def add_plan_command(sub: argparse._SubParsersAction, store_from_args: StoreFromArgs) -> None:
    """Add `fleetserve plan` to the serving CLI; `store_from_args` opens the registry's store."""

    planner = sub.add_parser(
        "plan", help="capacity plan: replay a trace through the real cache and router code"
    )
    source = planner.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--access-log", nargs="+", help="ingress log file(s) with serve_app.access JSON lines"
    )
    source.add_argument("--zipf", type=float, help="synthetic Zipf exponent over the registry")
    planner.add_argument("--requests", type=int, default=10_000, help="Zipf trace length")
    planner.add_argument("--rate", type=float, default=10.0, help="Zipf requests per second")
    planner.add_argument("--seed", type=int, default=0, help="Zipf seed")
    planner.add_argument("--replicas", type=_csv(int), default=[2], help="e.g. 1,2,4")
    planner.add_argument(
        "--budget",
        type=_csv(parse_bytes),
        default=None,
        help="per replica, e.g. 1GiB,2GiB (default 1GiB; with --pools-from-config: for "
        "pools without memory_budget)",
    )
    planner.add_argument(
        "--pools-from-config",
        action="store_true",
        help="replay on the pools, replicas, budgets and pool rules of --config instead",
    )
    planner.add_argument("--target-hit-rate", type=float, default=None, help="e.g. 0.9")
    planner.add_argument("--policy", choices=["lru", "gdsf"], default="lru")
    planner.add_argument(
        "--endpoint-bytes",
        type=parse_bytes,
        default=None,
        help="memory of one dedicated endpoint (default: the replica budget)",
    )
    planner.add_argument(
        "--load-fixed-s", type=float, default=0.15, help="load time of unlogged models: fixed"
    )
    planner.add_argument(
        "--load-mb-per-s", type=float, default=200.0, help="... plus bytes at this rate"
    )
    planner.add_argument("--json", action="store_true", help="print the plan as JSON")
    planner.set_defaults(func=functools.partial(cmd_plan, store_from_args=store_from_args))
