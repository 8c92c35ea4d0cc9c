"""Cold-request routing: fleetserve's router vs Ray's stock multiplexed router (issue 9 §3).

One private stack runs two copies of the fleet app side by side (2 host replicas each):

    fleet        `host.router: affinity` (cold models placed at once, by free budget)
    fleet-stock  `host.router: ray` (Ray Serve's power-of-two multiplexed router)

Each round publishes `--models` fresh small fraud models (~4 MB; each replica's budget
holds two) and requests them in two passes, each request a burst of `--burst` concurrent
requests (the way a model's traffic arrives):

    first   every model for the first time (never seen by any replica);
    again   every model once more, in the same order: by then LRU has evicted it, so no
            replica holds it (the long tail's usual case: requested, evicted, requested).

Per burst it records the slowest request's latency and the overhead: that latency minus
the load wait the host reports (`load_wait_ms`, the longest in the burst: requests queued
in the ingress behind the loading batch report none of their own). Ray's matching timeout
(1-2 s) would show up there (the stock router waits it out when the fewest-models replicas
reject a cold request).

    cold burst p50 fleet/stock     goal: < 1 (reported)
    routing overhead p99 fleet     goal: < 250 ms (well under the 1 s matching timeout)

Run: `.venv/bin/python -m bench.cold_routing` (it needs the machine to itself).
"""

from __future__ import annotations

import argparse
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx

from bench.load import percentile
from bench.local_stack import LocalStack, save_result, say, wait_until

MODEL_INDEX = 2  # a ~4 MB fraud MLP: the load itself is short, routing delays stand out
OVERHEAD_GOAL_MS = 250.0


def burst(url: str, model_id: str, size: int) -> dict[str, float]:
    """`size` concurrent first requests for `model_id`; the slowest one's numbers."""
    from devstack.demo_fleet import FRAUD_FEATURES

    body = {"inputs": [[0.1] * FRAUD_FEATURES]}

    def one(_: int) -> tuple[float, float]:
        started = time.perf_counter()
        response = httpx.post(f"{url}/v1/models/{model_id}/predict", json=body, timeout=60)
        response.raise_for_status()
        return (time.perf_counter() - started) * 1000, response.json()["load_wait_ms"]

    with ThreadPoolExecutor(size) as pool:
        results = list(pool.map(one, range(size)))
    # NOTE: requests of a burst that queued in the ingress behind the loading batch report
    # no load wait of their own; the burst as a whole waited for the one load.
    latency = max(r[0] for r in results)
    return {
        "latency_ms": round(latency, 2),
        "overhead_ms": round(latency - max(r[1] for r in results), 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=5, help="rounds (medians)")
    parser.add_argument("--models", type=int, default=6, help="fresh models per app per round")
    parser.add_argument("--burst", type=int, default=4, help="concurrent first requests")
    parser.add_argument("--out", type=Path, default=Path("bench/results/cold_routing.json"))
    args = parser.parse_args()

    from deployments.builder import build_app
    from devstack.demo_fleet import write_fraud_model
    from serve_app.storage.publisher import publish_path

    samples: dict[str, list[dict[str, Any]]] = {"fleet": [], "fleet-stock": []}
    with LocalStack() as stack:
        assert stack.store is not None
        host = {"num_replicas": 2, "num_cpus": 0.5, "memory_budget": "10MB"}
        stack.deploy_fleet(stack.fleet_config(host), [])
        urls = {
            "fleet": stack.url,
            "fleet-stock": stack.run_app(
                build_app(stack.fleet_config({**host, "router": "ray"})),
                "fleet-stock",
                "/fleet-stock",
            ),
        }
        src = write_fraud_model(stack.tmp / "m", MODEL_INDEX)
        for run in range(args.runs):
            ids = {name: [f"cold-{name}-{run}-{i}" for i in range(args.models)] for name in urls}
            for model_ids in ids.values():
                for model_id in model_ids:
                    publish_path(stack.store, src, model_id, "1")
            for name, url in urls.items():
                wait_until(
                    lambda url=url, wanted=ids[name]: all(
                        httpx.get(f"{url}/v1/models/{m}", timeout=10).status_code == 200
                        for m in wanted
                    ),
                    30,
                    "the registry",
                )
            for phase in ("first", "again"):
                for i in range(args.models):  # interleave the two apps
                    for name, url in urls.items():
                        result = burst(url, ids[name][i], args.burst)
                        samples[name].append({"phase": phase, **result})
            say(
                f"run {run + 1}/{args.runs}: "
                + "  ".join(
                    f"{n} burst p50 {statistics.median(s['latency_ms'] for s in v):.0f} ms "
                    f"overhead max {max(s['overhead_ms'] for s in v):.0f} ms"
                    for n, v in samples.items()
                )
            )

    medians: dict[str, Any] = {}
    for name, rows in samples.items():
        medians[name] = {}
        for phase in ("first", "again", "all"):
            picked = [r for r in rows if phase in ("all", r["phase"])]
            latencies = [r["latency_ms"] for r in picked]
            overheads = [r["overhead_ms"] for r in picked]
            medians[name][phase] = {
                "burst_latency_p50_ms": round(statistics.median(latencies), 2),
                "burst_latency_p99_ms": round(percentile(latencies, 0.99), 2),
                "overhead_p50_ms": round(statistics.median(overheads), 2),
                "overhead_p99_ms": round(percentile(overheads, 0.99), 2),
            }
    ratios = {
        "cold burst p50 fleet/stock": round(
            medians["fleet"]["all"]["burst_latency_p50_ms"]
            / medians["fleet-stock"]["all"]["burst_latency_p50_ms"],
            3,
        ),
        "routing overhead p99 fleet (ms)": medians["fleet"]["all"]["overhead_p99_ms"],
    }
    goals = {"cold burst p50 fleet/stock": "< 1.0", "routing overhead p99 fleet (ms)": "< 250"}
    passed = {
        "cold burst p50 fleet/stock": ratios["cold burst p50 fleet/stock"] < 1.0,
        "routing overhead p99 fleet (ms)": medians["fleet"]["all"]["overhead_p99_ms"]
        < OVERHEAD_GOAL_MS,
    }
    for name, ratio in ratios.items():
        print(f"{name} = {ratio:.2f} (goal {goals[name]}) {'PASS' if passed[name] else 'FAIL'}")
    for name, phases in medians.items():
        for phase, values in phases.items():
            print(f"  {name} {phase}: {values}")
    save_result(
        "cold_routing",
        args,
        samples=samples,
        medians=medians,
        ratios=ratios,
        goals=goals,
    )


if __name__ == "__main__":
    main()
