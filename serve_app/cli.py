"""The `fleetserve` command line: publishing, and calls to a running fleet.

The local stack's commands (`up`, `down`, `demo-fleet`, `bench`) come from `devstack.cli`
through the `fleetserve.cli` entry point; without the `local` extra they print how to
install it.

fleetserve up [--count N]            start SeaweedFS + Ray + the fleet app, demo fleet in S3
fleetserve down                      stop exactly what `up` started
fleetserve publish PATH --model-id ID [--version V] [--task T] [--top-k K]
fleetserve demo-fleet --count N [--vision N]   publish the demo fleet
fleetserve models                    published models and where they are resident
fleetserve predict MODEL_ID JSON     call a model, e.g. '["some text"]'
fleetserve load MODEL_ID [--replicas N] | unload MODEL_ID | pin MODEL_ID [--remove]
fleetserve plan (--access-log FILE... | --zipf A) --replicas 1,2 --budget 1GiB,2GiB
                                     capacity plan: replay a trace through the real cache
fleetserve kuberay [-o FILE] [--check] render ops/kuberay/rayservice.yaml from config.yaml
fleetserve bench [NAMES...] [--runs N]  run benchmarks (bench/<name>.py) from a repo checkout
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from importlib.metadata import entry_points
from pathlib import Path
from typing import get_args

from serve_app.api.client import (
    DEFAULT_URL,
    FleetClient,
    FleetClientError,
    format_models,
    format_stats,
)
from serve_app.config import load_config
from serve_app.errors import FleetError
from serve_app.storage.manifest import Task
from serve_app.storage.store import ModelStore

# NOTE: the local stack (devstack/) adds its commands through this entry-point group, so the
# serving package never imports it; `pip install .` alone gets the serving commands only.
PLUGIN_GROUP = "fleetserve.cli"
LOCAL_COMMANDS = ("up", "down", "demo-fleet", "bench")


def store_from_args(args: argparse.Namespace) -> ModelStore:
    """The model store the global options name (the local stack's S3 by default)."""
    if not os.environ.get("AWS_ENDPOINT_URL"):
        # NOTE: default to the local stack's S3 when no endpoint is configured.
        for plugin in args.plugins:
            for key, value in plugin.default_env(Path(args.state_dir)).items():
                os.environ.setdefault(key, value)
    config = load_config(args.config).store
    if args.store_url:
        config = config.model_copy(update={"url": args.store_url})
    store = ModelStore(config)
    store.ensure_bucket()
    return store


def cmd_publish(args: argparse.Namespace) -> int:
    from serve_app.storage.publisher import print_progress, publish_path

    manifest = publish_path(
        store_from_args(args),
        Path(args.path),
        args.model_id,
        args.version,
        args.task,
        progress=print_progress(args.model_id),
        top_k=args.top_k,
    )
    print(json.dumps({"model_id": manifest.model_id, "version": manifest.version}))
    return 0


def _client(args: argparse.Namespace) -> FleetClient:
    return FleetClient(args.url, admin_key=args.admin_key)


def cmd_models(args: argparse.Namespace) -> int:
    client = _client(args)
    models = client.models()
    try:
        replicas: list | None = client.replicas()
    except FleetClientError as exc:
        # NOTE: management may be off or need a key; the registry listing still helps.
        print(f"residency not shown: {exc}", file=sys.stderr)
        replicas = None
    print(format_models(models, replicas, time.time()))
    return 0


def _print_action(result: dict) -> int:
    for r in result["replicas"]:
        state = (
            f"resident={r['resident']} pinned={r['pinned']} {r['bytes'] / 1e6:.1f} MB"
            if r["ok"]
            else f"FAILED {r['code']}: {r['error']}"
        )
        print(
            f"{result['action']} {result['model_id']} v{','.join(result['versions'])} "
            f"on {r['replica']}: {state}"
        )
    return 0 if all(r["ok"] for r in result["replicas"]) else 1


def cmd_load(args: argparse.Namespace) -> int:
    return _print_action(_client(args).load(args.model_id, args.version, args.replicas))


def cmd_unload(args: argparse.Namespace) -> int:
    return _print_action(_client(args).unload(args.model_id, args.version))


def cmd_pin(args: argparse.Namespace) -> int:
    client = _client(args)
    if args.remove:
        return _print_action(client.unpin(args.model_id, args.version))
    return _print_action(client.pin(args.model_id, args.version))


def cmd_predict(args: argparse.Namespace) -> int:
    result = FleetClient(args.url).predict(args.model_id, json.loads(args.inputs), args.version)
    print(json.dumps(result))
    return 0


def cmd_stats(args: argparse.Namespace) -> int:
    report = FleetClient(args.url).stats(args.window)
    print(json.dumps(report, indent=2) if args.json else format_stats(report))
    return 0


def cmd_top(args: argparse.Namespace) -> int:
    client = FleetClient(args.url)
    shown = 0
    while args.iterations is None or shown < args.iterations:
        report = client.stats(args.window)
        # NOTE: ANSI clear-screen + home, like top(1).
        print(f"\033[2J\033[Hfleetserve top  {args.url}  every {args.interval}s  (Ctrl-C quits)")
        print(format_stats(report, limit=args.limit), flush=True)
        shown += 1
        if args.iterations is None or shown < args.iterations:
            time.sleep(args.interval)
    return 0


def _csv(kind):  # type: ignore[no-untyped-def]
    def parse(text: str) -> list:
        return [kind(part) for part in text.split(",") if part.strip()]

    return parse


def cmd_plan(args: argparse.Namespace) -> int:
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


def cmd_kuberay(args: argparse.Namespace) -> int:
    from serve_app.deploy.kuberay import KubeRayOptions, render_manifest

    options = KubeRayOptions(
        image=args.image, name=args.name, gcs_redis_address=args.gcs_redis_address
    )
    text = render_manifest(Path(args.config), options)
    if args.check:
        current = Path(args.output).read_text() if Path(args.output).exists() else ""
        if current != text:
            print(f"{args.output} is out of date: run `fleetserve kuberay`", file=sys.stderr)
            return 1
        return 0
    if args.output == "-":
        sys.stdout.write(text)
    else:
        Path(args.output).write_text(text)
        print(f"wrote {args.output}", file=sys.stderr)
    return 0


def _add_plan_parser(sub: argparse._SubParsersAction) -> None:
    from serve_app.config import parse_bytes

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
    planner.set_defaults(func=cmd_plan)

    kuberay = sub.add_parser("kuberay", help="render the KubeRay RayService from config.yaml")
    kuberay.add_argument("-o", "--output", default="ops/kuberay/rayservice.yaml")
    kuberay.add_argument("--image", default=None, help="container image of every Ray pod")
    kuberay.add_argument("--name", default=None, help="RayService name")
    kuberay.add_argument(
        "--gcs-redis-address",
        default=None,
        help="turn on GCS fault tolerance with this external Redis (password: Secret "
        "fleet-redis, key `password`)",
    )
    kuberay.add_argument(
        "--check", action="store_true", help="exit 1 if the output file differs (CI)"
    )
    kuberay.set_defaults(func=cmd_kuberay)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of `fleetserve`."""
    parser = argparse.ArgumentParser(prog="fleetserve", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--config", default="config.yaml", help="Serve config (default: %(default)s)"
    )
    parser.add_argument(
        "--state-dir", default=".state", help="local stack state (default: %(default)s)"
    )
    parser.add_argument("--store-url", default=None, help="override store.url, e.g. s3://b/prefix")
    parser.add_argument("--url", default=DEFAULT_URL, help="fleet HTTP API (default: %(default)s)")
    sub = parser.add_subparsers(dest="command", required=True)

    pub = sub.add_parser("publish", help="publish a model folder as a new version")
    pub.add_argument("path")
    pub.add_argument("--model-id", required=True)
    pub.add_argument("--version", default=None, help="default: next numeric version")
    pub.add_argument(
        "--task",
        default=None,
        choices=list(get_args(Task)),
        help="default: inferred from the folder (image-embedding must be given)",
    )
    pub.add_argument(
        "--top-k", type=int, default=None, help="labels an image classifier answers (5)"
    )
    pub.set_defaults(func=cmd_publish)

    parser.add_argument(
        "--admin-key",
        default=os.environ.get("FLEET_ADMIN_KEY"),
        help="admin key for management calls (default: $FLEET_ADMIN_KEY)",
    )
    sub.add_parser("models", help="published models and where they are resident").set_defaults(
        func=cmd_models
    )
    load = sub.add_parser("load", help="load (prewarm) a model on N replicas")
    load.add_argument("model_id")
    load.add_argument("--version", default=None, help="default: the latest")
    load.add_argument("--replicas", type=int, default=1, help="how many replicas")
    load.set_defaults(func=cmd_load)
    unload = sub.add_parser("unload", help="unpin and evict a model from every replica")
    unload.add_argument("model_id")
    unload.add_argument("--version", default=None, help="default: every version")
    unload.set_defaults(func=cmd_unload)
    pin = sub.add_parser("pin", help="pin a model on every replica (--remove: unpin)")
    pin.add_argument("model_id")
    pin.add_argument("--version", default=None, help="default: the latest (unpin: all)")
    pin.add_argument("--remove", action="store_true", help="release the pin instead")
    pin.set_defaults(func=cmd_pin)

    stats = sub.add_parser("stats", help="per-model latency, hit rate, cold starts")
    stats.add_argument("--window", type=float, default=None, help="seconds (default: server's)")
    stats.add_argument("--json", action="store_true", help="print the raw JSON report")
    stats.set_defaults(func=cmd_stats)

    top = sub.add_parser("top", help="live per-model stats in the terminal")
    top.add_argument("--window", type=float, default=60.0, help="seconds of history")
    top.add_argument("--interval", type=float, default=2.0, help="seconds between refreshes")
    top.add_argument("--limit", type=int, default=30, help="rows shown")
    top.add_argument("--iterations", type=int, default=None, help="stop after N refreshes")
    top.set_defaults(func=cmd_top)

    pred = sub.add_parser("predict", help="call a model over HTTP")
    pred.add_argument("model_id")
    pred.add_argument("inputs", help="JSON list, e.g. '[\"hello\"]' or '[[0.1, 0.2, ...]]'")
    pred.add_argument("--version", default=None)
    pred.set_defaults(func=cmd_predict)
    _add_plan_parser(sub)

    plugins = []
    for entry_point in entry_points(group=PLUGIN_GROUP):
        try:
            plugin = entry_point.load()
        except ImportError as exc:
            # NOTE: the local stack's code or its extra is not installed: its commands
            # still appear, and say how to get them.
            plugin = _MissingExtra(entry_point.name, exc)
        plugin.register(sub)
        plugins.append(plugin)
    if not plugins:
        _MissingExtra("local", None).register(sub)
    parser.set_defaults(plugins=plugins)
    return parser


class _MissingExtra:
    """Stands in for a plugin that cannot load: its commands print how to install it."""

    def __init__(self, extra: str, error: ImportError | None) -> None:
        self.extra = extra
        self.error = error

    def register(self, sub: argparse._SubParsersAction) -> None:
        for name in LOCAL_COMMANDS:
            if name not in sub.choices:
                command = sub.add_parser(name, help=f"(needs the `{self.extra}` extra)")
                command.add_argument("rest", nargs=argparse.REMAINDER)
                command.set_defaults(func=self.hint)

    def hint(self, args: argparse.Namespace) -> int:
        missing = f" ({self.error.name} is missing)" if self.error and self.error.name else ""
        print(
            f"error: `fleetserve {args.command}` needs the local stack{missing}: "
            f"pip install 'fleetserve[{self.extra}]'",
            file=sys.stderr,
        )
        return 2

    def default_env(self, state_dir: Path) -> dict[str, str]:
        return {}


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `fleetserve` console script."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except FleetError as exc:
        print(f"error: {exc} ({exc.code})", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
