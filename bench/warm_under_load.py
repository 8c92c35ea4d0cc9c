"""B7: warm p99 while cold loads run / warm p99 without (issue 9 §4, goal <= 1.5).

One private stack runs the fleet with ONE host replica (so every load lands on the replica
that serves the warm traffic) and a budget that holds the warm fraud model and one copy of
minilm-embed (~91 MB). Each round has two windows of `--seconds`:

    quiet   `--clients` closed-loop clients on the warm fraud model, nothing else;
    loaded  the same clients, while a loader client requests `--copies` published copies of
            minilm-embed round-robin: every request is a cold load (fetch, verify,
            deserialise, build BERT) that evicts the previous copy.

Window order alternates per round; ratios use the medians over `--runs` rounds.

Run: `.venv/bin/python -m bench.warm_under_load` (it needs the machine to itself).
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time
from pathlib import Path
from typing import Any

import httpx

from bench.load import closed_loop
from bench.local_stack import LocalStack, save_result, say

WARM_ID = "warm-fraud"
GOAL = 1.5


def churn(url: str, ids: list[str], stop: threading.Event, loads: list[float]) -> None:
    """Request the copies round-robin until `stop`; record each load's wait (ms)."""
    i = 0
    with httpx.Client(timeout=120) as http:
        while not stop.is_set():
            model_id = ids[i % len(ids)]
            i += 1
            response = http.post(
                f"{url}/v1/models/{model_id}/predict", json={"inputs": ["warm traffic flows"]}
            )
            response.raise_for_status()
            body = response.json()
            if not body["resident"]:
                loads.append(body["load_wait_ms"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=5, help="rounds (medians)")
    parser.add_argument("--clients", type=int, default=4, help="warm closed-loop clients")
    parser.add_argument("--seconds", type=float, default=6.0, help="seconds per window")
    parser.add_argument("--copies", type=int, default=3, help="minilm-embed copies to churn")
    parser.add_argument(
        "--serve-defaults",
        action="store_true",
        help="Serve's default process settings (serve_env: {}), as before issue 16",
    )
    parser.add_argument(
        "--s3-nice",
        type=int,
        default=0,
        help="run the local S3 server this many nice steps down (15: as the Ray workers, "
        "like a store on other machines that cannot take the replicas' CPU)",
    )
    parser.add_argument("--out", type=Path, default=Path("bench/results/warm_under_load.json"))
    args = parser.parse_args()

    from devstack.demo_fleet import FRAUD_FEATURES, minilm_dir, write_fraud_model
    from serve_app.storage.publisher import publish_path

    samples: dict[str, list[dict[str, Any]]] = {"quiet": [], "loaded": []}
    with LocalStack(s3_niceness=args.s3_nice) as stack:
        assert stack.store is not None
        publish_path(stack.store, write_fraud_model(stack.tmp / "w", 7), WARM_ID, "1")
        copies = [f"minilm-copy-{i}" for i in range(args.copies)]
        for model_id in copies:
            publish_path(stack.store, minilm_dir(), model_id, "1")
        host = {"num_replicas": 1, "num_cpus": 0.5, "memory_budget": "150MB"}
        if args.serve_defaults:
            host["serve_env"] = {}
        ingress = {"serve_env": {}} if args.serve_defaults else None
        stack.deploy_fleet(stack.fleet_config(host, ingress), [WARM_ID, *copies])
        url = f"{stack.url}/v1/models/{WARM_ID}/predict"
        body = {"inputs": [[0.1] * FRAUD_FEATURES]}
        closed_loop(url, body, args.clients, seconds=1.0)  # load the warm model
        # NOTE: the first BERT build in a fresh replica pays transformers' lazy imports.
        httpx.post(
            f"{stack.url}/v1/models/{copies[0]}/predict", json={"inputs": ["x"]}, timeout=120
        ).raise_for_status()
        for run in range(args.runs):
            for window in ("quiet", "loaded") if run % 2 == 0 else ("loaded", "quiet"):
                loads: list[float] = []
                stop = threading.Event()
                worker = threading.Thread(target=churn, args=(stack.url, copies, stop, loads))
                if window == "loaded":
                    worker.start()
                    time.sleep(0.5)  # let the first load start
                result = closed_loop(url, body, args.clients, args.seconds, warmup_s=0)
                if window == "loaded":
                    stop.set()
                    worker.join()
                    result["cold_loads"] = len(loads)
                    result["load_wait_p50_ms"] = round(statistics.median(loads or [0.0]), 1)
                samples[window].append(result)
                say(
                    f"run {run + 1}/{args.runs} {window:6s} warm p50 {result['p50_ms']:.1f} ms "
                    f"p99 {result['p99_ms']:.1f} ms  {result['rps']:.0f} req/s"
                    + (f"  ({result['cold_loads']} cold loads)" if window == "loaded" else "")
                )

    medians = {
        window: {
            key: round(statistics.median(r[key] for r in rows), 3)
            for key in ("p50_ms", "p99_ms", "rps")
        }
        for window, rows in samples.items()
    }
    medians["loaded"]["cold_loads"] = statistics.median(r["cold_loads"] for r in samples["loaded"])
    ratio = round(medians["loaded"]["p99_ms"] / medians["quiet"]["p99_ms"], 3)
    p50_ratio = round(medians["loaded"]["p50_ms"] / medians["quiet"]["p50_ms"], 3)
    verdict = "PASS" if ratio <= GOAL else "FAIL"
    print(f"B7 warm p99 loaded/quiet = {ratio:.2f} (goal <= {GOAL}) {verdict}")
    print(f"   warm p50 loaded/quiet = {p50_ratio:.2f} (reported)")
    for window, values in medians.items():
        print(f"  {window}: {values}")
    save_result(
        "warm_under_load",
        args,
        samples=samples,
        medians=medians,
        ratios={"B7 warm p99 loaded/quiet": ratio, "warm p50 loaded/quiet": p50_ratio},
        goals={"B7 warm p99 loaded/quiet": f"<= {GOAL}"},
    )


if __name__ == "__main__":
    main()
