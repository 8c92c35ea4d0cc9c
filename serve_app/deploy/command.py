"""`fleetserve kuberay`: render (or --check) ops/kuberay/rayservice.yaml from config.yaml."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


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


def add_kuberay_command(sub: argparse._SubParsersAction) -> None:
    """Add `fleetserve kuberay` to the serving CLI."""
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
