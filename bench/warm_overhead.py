"""Warm-request overhead of the fleet vs a plain single-model Serve deployment (B4).

Deploys, next to the running `fleet` app, a one-replica app `bench-plain` that holds
minilm-embed (loaded with the same loader, so the model code is identical) and answers at
`/bench-plain`. Then sends the same request `--n` times, sequentially, to both:

    fleet:  POST /v1/models/minilm-embed/predict   (ingress -> multiplexed host replica)
    plain:  POST /bench-plain/                      (one deployment, no routing by model)

and reports p50/p99 of each and their ratio. Run against the local stack:
`make up`, then `.venv/bin/python -m bench.warm_overhead`.
"""

# NOTE: no `from __future__ import annotations` here: FastAPI must see the real `Request`
# annotation of the route defined inside build_plain_app.
import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import httpx
from fastapi import Request

from serve_app.client import DEFAULT_URL
from serve_app.config import StoreConfig, load_config

TEXT = ["the quick brown fox jumps over the lazy dog"]


def build_plain_app(store_config: StoreConfig) -> Any:
    """A one-replica Serve app that serves minilm-embed, version 1, directly."""
    from fastapi import FastAPI
    from ray import serve

    api = FastAPI()

    @serve.deployment(name="Plain", ray_actor_options={"num_cpus": 0.5})
    @serve.ingress(api)
    class Plain:
        def __init__(self, config: StoreConfig) -> None:
            import tempfile

            import torch

            from serve_app.loader import ModelLoader
            from serve_app.store import DiskTier, ModelStore

            torch.set_num_threads(1)
            store = ModelStore(config)
            loader = ModelLoader(
                store, DiskTier(Path(tempfile.mkdtemp()), 2**31), torch.device("cpu")
            )
            self.model = loader.load(store.read_manifest("minilm-embed", "1"))

        @api.post("/")
        async def predict(self, request: Request) -> dict[str, Any]:
            body = await request.json()
            return {"outputs": await asyncio.to_thread(self.model.predict, body["inputs"])}

    return Plain.bind(store_config)


def measure(url: str, n: int) -> list[float]:
    samples = []
    with httpx.Client(timeout=120) as http:
        for _ in range(5):  # warm-up: loads the model where needed, fills connections
            http.post(url, json={"inputs": TEXT}).raise_for_status()
        for _ in range(n):
            started = time.perf_counter()
            http.post(url, json={"inputs": TEXT}).raise_for_status()
            samples.append((time.perf_counter() - started) * 1000)
    return samples


def summary(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    return {
        "p50_ms": round(statistics.median(ordered), 2),
        "p99_ms": round(ordered[int(0.99 * (len(ordered) - 1))], 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--url", default=DEFAULT_URL)
    parser.add_argument("--config", default="config.yaml")
    parser.add_argument("--state-dir", default=".state")
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--out", default="bench/results/warm_overhead.json")
    args = parser.parse_args()
    from serve_app.stack import RAY_AUTH_ENV, RAY_LOOPBACK_ENV, load_stack_env

    os.environ.update({**RAY_AUTH_ENV, **RAY_LOOPBACK_ENV})
    if not os.environ.get("AWS_ENDPOINT_URL"):
        os.environ.update(load_stack_env(Path(args.state_dir)))
    import ray
    from ray import serve

    ray.init(address="auto", logging_level="ERROR")
    store_config = load_config(args.config).store
    serve.run(build_plain_app(store_config), name="bench-plain", route_prefix="/bench-plain")
    try:
        rounds = []
        for _ in range(3):  # interleave so drift hits both alike
            fleet = measure(f"{args.url}/v1/models/minilm-embed/predict", args.n // 3)
            plain = measure(f"{args.url}/bench-plain/", args.n // 3)
            rounds.append((fleet, plain))
        fleet_all = [x for f, _ in rounds for x in f]
        plain_all = [x for _, p in rounds for x in p]
        result = {
            "fleet": summary(fleet_all),
            "plain": summary(plain_all),
            "n": len(fleet_all),
        }
        result["p50_ratio"] = round(result["fleet"]["p50_ms"] / result["plain"]["p50_ms"], 2)
        result["p99_ratio"] = round(result["fleet"]["p99_ms"] / result["plain"]["p99_ms"], 2)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2))
        print(json.dumps(result, indent=2))
    finally:
        serve.delete("bench-plain")
        print("removed bench-plain", file=sys.stderr)


if __name__ == "__main__":
    main()
