"""B6: cold-request latency / (raw fetch time + warm latency), through the real endpoint.

Starts SeaweedFS, Ray and the real `fleet` app (2 host replicas) on loopback, and beside it
Ray's built-in `@serve.multiplexed` (count-based, same loader) as the baseline. Each run
publishes fresh copies of minilm-embed (91 MB) and the demo's largest fraud model (19 MB)
under new ids, so every first request is a true cold load from S3, then measures:
raw = the reference reader on the same bytes; cold = the first HTTP request's latency;
warm = median of 10 more. Goal: fleet cold / (raw + warm) <= 1.3.
"""

from __future__ import annotations

import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx

from bench import harness

TEXT = ["the quick brown fox jumps over the lazy dog"]
FRAUD_INDEX = 41


def timed_post(url: str, body: dict[str, Any], headers: dict[str, str] | None = None) -> float:
    started = time.perf_counter()
    response = httpx.post(url, json=body, headers=headers or {}, timeout=120)
    elapsed = time.perf_counter() - started
    response.raise_for_status()
    return elapsed


def wait_listed(url: str, model_id: str) -> None:
    deadline = time.monotonic() + 60
    while httpx.get(f"{url}/v1/models/{model_id}", timeout=10).status_code != 200:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{model_id} never showed up in the registry")
        time.sleep(0.1)


def main() -> None:
    args = harness.parse_args(__doc__.split("\n")[0])
    from devstack.demo_fleet import minilm_dir, write_fraud_model
    from serve_app.storage.publisher import publish_path

    result = harness.Result("b6_cold_request", args.runs)
    work = Path(tempfile.mkdtemp(prefix="fleet-b6-"))
    kinds = {
        "minilm-embed": (minilm_dir(), TEXT),
        "fraud-19mb": (write_fraud_model(work / "fraud", FRAUD_INDEX), [[0.25] * 32]),
    }
    host = {"num_replicas": 2, "num_cpus": 0.5, "memory_budget": "1GB"}
    with harness.local_s3() as store, harness.serve_stack(store, host, 3) as (url, mux, _):
        stamp = int(time.time())
        # NOTE: warm-up: the first load in a fresh replica pays transformers' lazy imports;
        # concurrent requests for several ids reach every replica of both apps.
        warmups = []
        for kind, (src, inputs) in kinds.items():
            for i in range(4):
                model_id = f"warmup-{kind}-{stamp}-{i}"
                publish_path(store, Path(src), model_id, "1")
                warmups.append((model_id, inputs))
        for model_id, _ in warmups:
            wait_listed(url, model_id)

        def warm(item: tuple[str, Any]) -> None:
            model_id, inputs = item
            timed_post(f"{url}/v1/models/{model_id}/predict", {"inputs": inputs})
            timed_post(mux, {"inputs": inputs}, {"serve_multiplexed_model_id": model_id})

        with ThreadPoolExecutor(4) as pool:
            list(pool.map(warm, warmups))
        for run in range(args.runs):
            for kind, (src, inputs) in kinds.items():
                model_id = f"b6-{kind}-{stamp}-{run}"
                manifest = publish_path(store, Path(src), model_id, "1")
                wait_listed(url, model_id)
                raw = harness.reference_read(store, manifest)
                predict = f"{url}/v1/models/{model_id}/predict"
                cold = timed_post(predict, {"inputs": inputs})
                warm = harness.median([timed_post(predict, {"inputs": inputs}) for _ in range(10)])
                header = {"serve_multiplexed_model_id": model_id}
                mux_cold = timed_post(mux, {"inputs": inputs}, header)
                mux_warm = harness.median(
                    [timed_post(mux, {"inputs": inputs}, header) for _ in range(10)]
                )
                for key, value in {
                    "raw_s": raw,
                    "cold_s": cold,
                    "warm_s": warm,
                    "ratio": cold / (raw + warm),
                    "mux_cold_s": mux_cold,
                    "mux_warm_s": mux_warm,
                    "mux_ratio": mux_cold / (raw + mux_warm),
                }.items():
                    result.sample(f"{kind}.{key}", value)
                harness.progress(
                    f"run {run + 1}/{args.runs} {kind}: raw {raw * 1000:.0f} ms, fleet cold "
                    f"{cold * 1000:.0f} / warm {warm * 1000:.1f} ms, multiplexed cold "
                    f"{mux_cold * 1000:.0f} / warm {mux_warm * 1000:.1f} ms"
                )
        result.finish_medians()
        for kind in kinds:
            m = result.medians
            fleet = m[f"{kind}.cold_s"] / (m[f"{kind}.raw_s"] + m[f"{kind}.warm_s"])
            base = m[f"{kind}.mux_cold_s"] / (m[f"{kind}.raw_s"] + m[f"{kind}.mux_warm_s"])
            result.goal(f"B6 {kind} cold/(raw+warm)", fleet, "<=", 1.3)
            result.notes[f"{kind}.multiplexed_baseline_ratio"] = round(base, 3)
            print(f"   baseline @serve.multiplexed {kind} cold/(raw+warm) = {base:.2f}")
    result.write(args.out)


if __name__ == "__main__":
    main()
