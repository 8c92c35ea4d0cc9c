"""Client-side load generation and summaries shared by the benchmarks.

`closed_loop` runs `clients` concurrent clients, each sending its next request as soon as
the previous one is answered (a closed loop, like the issue's "16 concurrent clients"),
from one asyncio loop with aiohttp (light on the CPU the servers share).
"""

from __future__ import annotations

import asyncio
import statistics
import time
from typing import Any

import aiohttp


def percentile(samples: list[float], q: float) -> float:
    """The `q` quantile (0..1) by nearest rank."""
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * (len(ordered) - 1) + 0.5))]


def summary(samples_ms: list[float]) -> dict[str, float]:
    """p50 / p99 / mean of latency samples in ms."""
    return {
        "p50_ms": round(statistics.median(samples_ms), 3),
        "p99_ms": round(percentile(samples_ms, 0.99), 3),
        "mean_ms": round(statistics.fmean(samples_ms), 3),
        "n": len(samples_ms),
    }


Target = tuple[str, dict[str, str] | None]  # (url, headers) of one request


async def _closed_loop(
    targets: list[Target],
    body: dict[str, Any],
    clients: int,
    seconds: float,
    warmup_s: float,
) -> dict[str, Any]:
    latencies: list[float] = []
    errors = 0
    connector = aiohttp.TCPConnector(limit=clients)
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        start = time.perf_counter()
        measure_from = start + warmup_s
        stop_at = measure_from + seconds

        async def client(turn: int) -> None:
            nonlocal errors
            while (now := time.perf_counter()) < stop_at:
                url, headers = targets[turn % len(targets)]
                turn += 1
                async with session.post(url, json=body, headers=headers) as response:
                    await response.read()
                    ok = response.status == 200
                done = time.perf_counter()
                if now >= measure_from:
                    if ok:
                        latencies.append((done - now) * 1000)
                    else:
                        errors += 1

        await asyncio.gather(*(client(i) for i in range(clients)))
    if not latencies:
        raise RuntimeError(f"no successful request to {targets[0][0]} ({errors} errors)")
    return {"rps": round(len(latencies) / seconds, 2), "errors": errors, **summary(latencies)}


def closed_loop(
    url: str,
    body: dict[str, Any],
    clients: int,
    seconds: float,
    warmup_s: float = 1.0,
    headers: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Throughput (`rps`, successful requests per second) and latency of `clients`
    concurrent closed-loop clients over `seconds` (after `warmup_s`)."""
    return asyncio.run(_closed_loop([(url, headers)], body, clients, seconds, warmup_s))


def closed_loop_over(
    targets: list[Target], body: dict[str, Any], clients: int, seconds: float, warmup_s: float = 1.0
) -> dict[str, Any]:
    """`closed_loop` where each client cycles over `targets` (one model per target), client
    `i` starting at target `i`: with as many clients as a multiple of the targets, every
    target sees the same share of the load."""
    return asyncio.run(_closed_loop(targets, body, clients, seconds, warmup_s))


def sequential(
    url: str, body: dict[str, Any], n: int, headers: dict[str, str] | None = None
) -> list[float]:
    """Latencies (ms) of `n` sequential requests, after 5 warm-up requests."""
    import httpx

    samples = []
    with httpx.Client(timeout=120, headers=headers) as http:
        for _ in range(5):
            http.post(url, json=body).raise_for_status()
        for _ in range(n):
            started = time.perf_counter()
            http.post(url, json=body).raise_for_status()
            samples.append((time.perf_counter() - started) * 1000)
    return samples
