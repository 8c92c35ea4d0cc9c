"""Cold-load and warm latency of a running fleet, as ratios against baselines from the same run.

For each model kind (minilm-embed, a ~19 MB fraud model) the bench publishes `--copies`
distinct copies (fresh ids, so every first request is a true cold load from S3) and measures:

- raw:  parallel 8 MiB ranged GETs of the copy's files into one preallocated buffer, from
        this process (the "physical" read baseline, B1 in shared/reference/performance.md);
- cold: the client-measured latency of the first request (S3 -> verify -> build -> predict);
- warm: p50 / p99 of `--warm` further requests (model resident);
- compute: the same prediction run in-process on a locally loaded copy (model time alone).

Reported ratios: cold / (raw + warm p50)  (B6: 1.0 means a cold start costs only the read)
and warm p50 / compute p50 (what serving adds on top of the model).

Run against the local stack: `make up`, then `.venv/bin/python -m bench.cold_warm`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from serve_app.client import DEFAULT_URL, FleetClient, FleetClientError
from serve_app.config import load_config
from serve_app.demo import minilm_dir, write_fraud_model
from serve_app.loader import ModelLoader
from serve_app.manifest import Manifest
from serve_app.publisher import publish_path
from serve_app.stack import load_stack_env
from serve_app.store import DiskTier, ModelStore

CHUNK = 8 * 2**20
FRAUD_INDEX = 41  # the demo fleet's ~19 MB fraud model (the largest kind)


def raw_read_s(store: ModelStore, manifest: Manifest, workers: int = 4) -> float:
    """Seconds to read every file of `manifest` with ranged GETs into one buffer."""
    total = manifest.total_bytes
    buf = bytearray(total)
    view = memoryview(buf)
    jobs, offset = [], 0
    base = store.version_dir(manifest.model_id, manifest.version)
    for entry in manifest.files:
        for start in range(0, entry.size, CHUNK):
            end = min(start + CHUNK, entry.size)
            jobs.append((f"{base}/{entry.path}", start, end, offset + start))
        offset += entry.size

    def fetch(job: tuple[str, int, int, int]) -> None:
        path, start, end, at = job
        data = store.fs.cat_file(path, start=start, end=end)
        view[at : at + len(data)] = data

    started = time.perf_counter()
    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(fetch, jobs))
    return time.perf_counter() - started


def timed(fn: Any, *args: Any) -> tuple[float, Any]:
    started = time.perf_counter()
    result = fn(*args)
    return (time.perf_counter() - started) * 1000, result


def bench_kind(
    client: FleetClient, store: ModelStore, kind: str, src: Path, inputs: list[Any], args: Any
) -> dict[str, Any]:
    rows = []
    run = int(time.time())
    for i in range(args.copies):
        model_id = f"bench-{kind}-{run}-{i}"
        manifest = publish_path(store, src, model_id, "1")
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # the registry refresh picks it up
            try:
                client.describe(model_id)
                break
            except FleetClientError:  # 404 until the registry refresh sees it
                time.sleep(0.2)
        raw_ms = raw_read_s(store, manifest) * 1000
        cold_ms, first = timed(client.predict, model_id, inputs)
        assert first["resident"] is False, first
        warm = [timed(client.predict, model_id, inputs)[0] for _ in range(args.warm)]
        rows.append(
            {"raw_ms": raw_ms, "cold_ms": cold_ms, "warm": warm, "bytes": manifest.total_bytes}
        )
        print(
            f"  {model_id}: raw {raw_ms:.0f} ms, cold {cold_ms:.0f} ms, "
            f"warm p50 {statistics.median(warm):.1f} ms",
            file=sys.stderr,
        )
    # model compute alone, in this process, on a locally built copy
    loader = ModelLoader(store, DiskTier(Path(tempfile.mkdtemp()), 2**34), _cpu())
    predictor = loader.load(manifest)
    compute = [timed(predictor.predict, inputs)[0] for _ in range(args.warm)]
    warm_all = [w for r in rows for w in r["warm"]]
    cold = statistics.median(r["cold_ms"] for r in rows)
    raw = statistics.median(r["raw_ms"] for r in rows)
    warm_p50 = statistics.median(warm_all)
    return {
        "model_bytes": rows[0]["bytes"],
        "raw_read_ms_p50": round(raw, 1),
        "cold_ms_p50": round(cold, 1),
        "warm_ms_p50": round(warm_p50, 2),
        "warm_ms_p99": round(sorted(warm_all)[int(0.99 * (len(warm_all) - 1))], 2),
        "compute_ms_p50": round(statistics.median(compute), 2),
        "cold_over_raw_plus_warm": round(cold / (raw + warm_p50), 2),
        "warm_over_compute": round(warm_p50 / statistics.median(compute), 2),
        "copies": args.copies,
    }


def _cpu() -> Any:
    import torch

    torch.set_num_threads(1)
    return torch.device("cpu")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--url", default=DEFAULT_URL)
    parser.add_argument("--config", default="config.yaml")
    parser.add_argument("--state-dir", default=".state")
    parser.add_argument("--copies", type=int, default=5)
    parser.add_argument("--warm", type=int, default=50)
    parser.add_argument("--out", default="bench/results/cold_warm.json")
    args = parser.parse_args()
    if not os.environ.get("AWS_ENDPOINT_URL"):
        os.environ.update(load_stack_env(Path(args.state_dir)))
    store = ModelStore(load_config(args.config).store)
    client = FleetClient(args.url)
    work = tempfile.mkdtemp(prefix="fleet-bench-")
    kinds = {
        "minilm": (minilm_dir(), ["the quick brown fox jumps over the lazy dog"]),
        "fraud": (write_fraud_model(Path(work) / "fraud", FRAUD_INDEX), [[0.25] * 32]),
    }
    results = {}
    for kind, (src, inputs) in kinds.items():
        print(f"{kind}:", file=sys.stderr)
        results[kind] = bench_kind(client, store, kind, Path(src), inputs, args)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
