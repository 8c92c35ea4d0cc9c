"""B1: cold-load time / raw parallel ranged-GET time of the same bytes.

Cold load = `ModelLoader.load` from S3 with an empty disk tier (S3 -> verified buffers ->
tensors -> module on the device, eval mode); raw = the tuned reference reader
(`harness.reference_read`: 8 MiB ranged GETs, 4 at once, into one preallocated buffer) of
the same files, in the same run, alternating. Models: a 256 MB and a 50 MB torch MLP, and
minilm-embed (91 MB, transformers). Goals: <= 1.25 for models >= 200 MB, <= 1.5 below.
"""

from __future__ import annotations

import tempfile
import threading
import time
from pathlib import Path

from bench import harness


def main() -> None:
    args = harness.parse_args(__doc__.split("\n")[0])
    import torch

    from devstack.demo_fleet import minilm_dir
    from serve_app.loading.disk_tier import DiskTier
    from serve_app.loading.loader import ModelLoader
    from serve_app.storage.publisher import publish_path

    torch.set_num_threads(1)
    result = harness.Result("b1_cold_load", args.runs)
    work = Path(tempfile.mkdtemp(prefix="fleet-b1-"))
    with harness.local_s3() as store:
        models = {
            "mlp-256mb": publish_path(store, harness.write_mlp(work / "m256", 256), "mlp-256", "1"),
            "mlp-50mb": publish_path(store, harness.write_mlp(work / "m50", 50), "mlp-50", "1"),
            "minilm-embed": publish_path(store, minilm_dir(), "minilm-embed", "1"),
        }
        # NOTE: warm-up: imports and first-touch costs of a fresh process are not B1's subject
        warm = ModelLoader(store, DiskTier(work / "warm", 2**34), torch.device("cpu"))
        for manifest in models.values():
            warm.load(manifest)
            harness.reference_read(store, manifest)
        _join_disk_writers()
        for run in range(args.runs):
            for name, manifest in models.items():
                raw = harness.reference_read(store, manifest)
                loader = ModelLoader(
                    store, DiskTier(work / f"disk-{run}-{name}", 2**34), torch.device("cpu")
                )
                started = time.perf_counter()
                predictor = loader.load(manifest)
                cold = time.perf_counter() - started
                result.sample(f"{name}.raw_s", raw)
                result.sample(f"{name}.cold_s", cold)
                result.sample(f"{name}.ratio", cold / raw)
                harness.progress(
                    f"run {run + 1}/{args.runs} {name}: raw {raw * 1000:.0f} ms, "
                    f"cold {cold * 1000:.0f} ms, {cold / raw:.2f}x"
                )
                del predictor
                _join_disk_writers()
                harness.trim_heap()
        result.finish_medians()
        for name, manifest in models.items():
            result.notes[f"{name}.bytes"] = manifest.total_bytes
            limit = 1.25 if manifest.total_bytes >= 200 * 10**6 else 1.5
            ratio = result.medians[f"{name}.cold_s"] / result.medians[f"{name}.raw_s"]
            result.goal(f"B1 {name} cold/raw", ratio, "<=", limit)
    result.write(args.out)


def _join_disk_writers() -> None:
    for thread in threading.enumerate():
        if thread.name.startswith("disk-tier:"):
            thread.join()


if __name__ == "__main__":
    main()
