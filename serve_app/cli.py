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
fleetserve hash-key < KEY_FILE       the `sha256:...` hash of a key, for auth.tenants config
fleetserve bench [NAMES...] [--runs N]  run benchmarks (bench/<name>.py) from a repo checkout

Calls to the fleet send the admin key: --admin-key, else $FLEET_ADMIN_KEY, else the file
$FLEET_ADMIN_KEY_FILE, else `<--state-dir>/admin_key` (where `fleetserve up` writes it).
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
from serve_app.deploy.command import add_kuberay_command
from serve_app.errors import FleetError
from serve_app.planning.command import add_plan_command
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


ADMIN_KEY_FILE = "admin_key"


def admin_key(given: str | None, state_dir: str = ".state") -> str | None:
    """The admin key: `given`, else $FLEET_ADMIN_KEY, else the file $FLEET_ADMIN_KEY_FILE,
    else `<state_dir>/admin_key` (what `fleetserve up` writes)."""
    if given:
        return given
    if os.environ.get("FLEET_ADMIN_KEY"):
        return os.environ["FLEET_ADMIN_KEY"]
    path = Path(os.environ.get("FLEET_ADMIN_KEY_FILE") or Path(state_dir) / ADMIN_KEY_FILE)
    try:
        return path.read_text().strip() or None
    except OSError:
        return None


def _client(args: argparse.Namespace) -> FleetClient:
    return FleetClient(args.url, admin_key=admin_key(args.admin_key, args.state_dir))


def cmd_hash_key(args: argparse.Namespace) -> int:
    from serve_app.auth.keys import check_length, hash_key

    try:
        key = check_length(sys.stdin.read(), "stdin")
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(hash_key(key))
    return 0


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
    result = _client(args).predict(args.model_id, json.loads(args.inputs), args.version)
    print(json.dumps(result))
    return 0


def cmd_stats(args: argparse.Namespace) -> int:
    report = _client(args).stats(args.window)
    print(json.dumps(report, indent=2) if args.json else format_stats(report))
    return 0


def cmd_top(args: argparse.Namespace) -> int:
    client = _client(args)
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
        default=None,
        help="admin key (default: $FLEET_ADMIN_KEY, $FLEET_ADMIN_KEY_FILE, .state/admin_key)",
    )
    sub.add_parser(
        "hash-key", help="print the sha256 hash of the key on stdin (for auth.tenants)"
    ).set_defaults(func=cmd_hash_key)
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
    add_plan_command(sub, store_from_args)
    add_kuberay_command(sub)

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
