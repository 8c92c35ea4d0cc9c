"""Vision fleet: 60 image classifiers under Zipf traffic with a budget for a third of them,
and per-model batching on vs off for images (issue 17), in one run.

One private stack (SeaweedFS + Ray + Serve, see bench/local_stack.py):

1. `--models` (60) demo image classifiers (random-init ResNet / ConvNeXt / ViT with their
   processors, devstack/vision_models.py) are published; the `fleet` app gets 2 host
   replicas whose budgets together hold a third of the fleet's bytes.
2. Zipf traffic (`--zipf` exponent, ranks shuffled over the models): `--requests` requests of
   one JPEG each from `--concurrency` closed-loop clients. Reported: hit rate (the
   `X-Fleet-Cache` header), cold p50/p99 (misses), warm p50/p99 (hits).
3. Throughput on one warm model, `--clients` closed-loop clients of one image each, against
   the same app and a `fleet-nobatch` twin (`max_batch_size: 1`), interleaved over `--runs`
   rounds; the ratio of the medians is batching's gain.

Run: `fleetserve bench vision` (it needs the machine to itself).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import random
import statistics
import time
from pathlib import Path
from typing import Any

import aiohttp

from bench.load import closed_loop, summary
from bench.local_stack import LocalStack, save_result, say

THROUGHPUT_MODEL = 4  # index of the model measured for batching (a ConvNeXt)


def demo_image(seed: int, width: int = 160, height: int = 120) -> bytes:
    """A smooth (photo-like, compressible) random image as a JPEG."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    small = Image.fromarray(rng.integers(0, 256, (9, 12, 3), dtype=np.uint8))
    buffer = io.BytesIO()
    small.resize((width, height), Image.Resampling.BICUBIC).save(buffer, "JPEG", quality=85)
    return buffer.getvalue()


def zipf_sequence(ids: list[str], n: int, exponent: float, seed: int) -> list[str]:
    """`n` model ids drawn with Zipf weights over a shuffled ranking of `ids`."""
    rng = random.Random(seed)
    ranked = ids[:]
    rng.shuffle(ranked)
    weights = [1 / (rank + 1) ** exponent for rank in range(len(ranked))]
    return rng.choices(ranked, weights, k=n)


async def _replay(url: str, sequence: list[str], bodies: list[dict], clients: int) -> list:
    """Send the sequence's requests from `clients` closed-loop clients; per request
    (model, latency ms, cache header, status)."""
    records: list[tuple[str, float, str, int]] = []
    queue = list(enumerate(sequence))
    queue.reverse()
    timeout = aiohttp.ClientTimeout(total=300)
    async with aiohttp.ClientSession(timeout=timeout) as session:

        async def client() -> None:
            while queue:
                i, model_id = queue.pop()
                started = time.perf_counter()
                async with session.post(
                    f"{url}/v1/models/{model_id}/predict", json=bodies[i % len(bodies)]
                ) as response:
                    await response.read()
                    cache = response.headers.get("X-Fleet-Cache", "")
                    status = response.status
                records.append((model_id, (time.perf_counter() - started) * 1000, cache, status))

        await asyncio.gather(*(client() for _ in range(clients)))
    return records


def zipf_phase(url: str, ids: list[str], args: argparse.Namespace) -> dict[str, Any]:
    sequence = zipf_sequence(ids, args.requests, args.zipf, args.seed)
    bodies = [{"inputs": [base64.b64encode(demo_image(args.seed + i)).decode()]} for i in range(16)]
    started = time.perf_counter()
    records = asyncio.run(_replay(url, sequence, bodies, args.concurrency))
    elapsed = time.perf_counter() - started
    ok = [r for r in records if r[3] == 200]
    warm = [r[1] for r in ok if r[2] == "hit"]
    cold = [r[1] for r in ok if r[2] == "miss"]
    return {
        "requests": len(records),
        "errors": len(records) - len(ok),
        "distinct_models": len(set(sequence)),
        "hit_rate": round(len(warm) / max(1, len(ok)), 3),
        "cold": summary(cold) if cold else None,
        "warm": summary(warm) if warm else None,
        "rps": round(len(records) / elapsed, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=3, help="throughput rounds (medians)")
    parser.add_argument("--models", type=int, default=60)
    parser.add_argument("--requests", type=int, default=600, help="Zipf requests")
    parser.add_argument("--zipf", type=float, default=1.1, help="Zipf exponent")
    parser.add_argument("--concurrency", type=int, default=4, help="Zipf clients")
    parser.add_argument("--clients", type=int, default=16, help="throughput clients")
    parser.add_argument("--seconds", type=float, default=8.0, help="per throughput target")
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--cpus", type=float, default=0.5, help="CPUs per host replica")
    parser.add_argument("--seed", type=int, default=17)
    parser.add_argument("--out", type=Path, default=Path("bench/results/vision.json"))
    args = parser.parse_args()

    from deployments.builder import build_app
    from devstack.vision_models import vision_specs, write_vision_model
    from serve_app.storage.publisher import publish_path

    with LocalStack() as stack:
        assert stack.store is not None
        manifests = []
        for spec in vision_specs(args.models):
            folder = write_vision_model(stack.tmp / spec.model_id, spec, args.seed)
            manifests.append(publish_path(stack.store, folder, spec.model_id, "1"))
        total = sum(m.weight_bytes for m in manifests)
        budget = total // (3 * args.replicas)
        say(
            f"published {len(manifests)} models, {total / 1e6:.1f} MB; budget/replica "
            f"{budget / 1e6:.1f} MB (all replicas: a third of the fleet)"
        )
        ids = [m.model_id for m in manifests]
        host = {"num_replicas": args.replicas, "num_cpus": args.cpus, "memory_budget": budget}
        stack.deploy_fleet(stack.fleet_config(host), ids)
        say(f"Zipf phase: {args.requests} requests, {args.concurrency} clients")
        zipf = zipf_phase(stack.url, ids, args)
        say(f"Zipf: {zipf}")

        target = ids[THROUGHPUT_MODEL % len(ids)]
        nobatch = stack.fleet_config({**host, "batching": {"max_batch_size": 1}})
        base = stack.run_app(build_app(nobatch), "fleet-nobatch", "/fleet-nobatch")
        targets = {
            "batching on": f"{stack.url}/v1/models/{target}/predict",
            "batching off": f"{base}/v1/models/{target}/predict",
        }
        body = {"inputs": [base64.b64encode(demo_image(args.seed)).decode()]}
        for url in targets.values():
            closed_loop(url, body, args.clients, seconds=1.0, warmup_s=2.0)
        samples: dict[str, list[dict[str, Any]]] = {name: [] for name in targets}
        names = list(targets)
        for run in range(args.runs):
            for name in names[run % 2 :] + names[: run % 2]:
                result = closed_loop(targets[name], body, args.clients, args.seconds, warmup_s=0)
                samples[name].append(result)
                say(
                    f"run {run + 1}/{args.runs} {name:12s} {result['rps']:7.1f} req/s  "
                    f"p50 {result['p50_ms']:.1f} ms  p99 {result['p99_ms']:.1f} ms"
                )
        hosts = {r["replica"]: r for r in stack_replicas(stack.url)}

    medians = {
        name: {
            k: round(statistics.median(r[k] for r in rows), 3) for k in ("rps", "p50_ms", "p99_ms")
        }
        for name, rows in samples.items()
    }
    gain = round(medians["batching on"]["rps"] / medians["batching off"]["rps"], 3)
    print(
        f"hit rate = {zipf['hit_rate']:.3f} over {zipf['requests']} requests "
        f"({zipf['distinct_models']} models)"
    )
    for kind in ("cold", "warm"):
        s = zipf[kind]
        if s:
            print(f"{kind} p50 = {s['p50_ms']:.1f} ms, p99 = {s['p99_ms']:.1f} ms (n={s['n']})")
    print(
        f"throughput batching on/off = {gain:.2f} "
        f"({medians['batching on']['rps']:.1f} vs {medians['batching off']['rps']:.1f} req/s)"
    )
    save_result(
        "vision",
        args,
        models={"count": len(ids), "total_bytes": total, "budget_per_replica": budget},
        zipf=zipf,
        throughput={"model": target, "samples": samples, "medians": medians, "gain": gain},
        hosts={
            k: {f: v.get(f) for f in ("evictions", "loads", "batches", "largest_batch")}
            for k, v in hosts.items()
        },
    )


def stack_replicas(url: str) -> list[dict[str, Any]]:
    import httpx

    return httpx.get(f"{url}/v1/replicas", timeout=30).json()


if __name__ == "__main__":
    main()
