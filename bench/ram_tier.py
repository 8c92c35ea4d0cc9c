"""Host-RAM tier: reload of an evicted model from the RAM tier / from the disk tier / from S3.

`ModelLoader.load` of the same version three ways in each run, on this CPU: from S3 (local
SeaweedFS, empty tiers), from the disk tier (verified copy on disk, read + sha256 again),
and from the RAM tier (`host.ram_cache_bytes`: verified buffers still in host memory). Each
reload follows a `close()`, as an eviction does. On a GPU replica the RAM-tier reload adds
one pinned host-to-device copy; this bench has no GPU. The issue sets no number for the
tier; the goal below (RAM reload <= half the disk reload) is this project's own.
"""

from __future__ import annotations

import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from bench import harness


def _wait_for_disk_copies() -> None:
    for thread in threading.enumerate():
        if thread.name.startswith("disk-tier:"):
            thread.join()


def _timed_load(loader: Any, manifest: Any) -> float:
    started = time.perf_counter()
    predictor = loader.load(manifest)
    elapsed = time.perf_counter() - started
    predictor.close()
    _wait_for_disk_copies()
    return elapsed


def main() -> None:
    args = harness.parse_args(__doc__.split("\n")[0])
    import torch

    from devstack.demo_fleet import EMBEDDER_ID, _copy_minilm
    from serve_app.config import HostConfig
    from serve_app.loading.loader import ModelLoader
    from serve_app.storage.publisher import publish_path

    torch.set_num_threads(1)
    result = harness.Result("ram_tier", args.runs)
    work = Path(tempfile.mkdtemp(prefix="fleet-ram-tier-"))
    with harness.local_s3() as store:
        models = {
            "minilm-embed": publish_path(store, _copy_minilm(work / "minilm"), EMBEDDER_ID, "1"),
            "mlp-256mb": publish_path(store, harness.write_mlp(work / "m256", 256), "mlp-256", "1"),
        }
        for run in range(args.runs):
            for name, manifest in models.items():
                config = HostConfig(
                    memory_budget="4GB",
                    disk_cache_dir=str(work / f"disk-{run}-{name}"),
                    ram_cache_bytes="4GB",
                )
                loader = ModelLoader.from_config(store, config, torch.device("cpu"))
                s3 = _timed_load(loader, manifest)
                ram = _timed_load(loader, manifest)
                loader.ram = None  # the same loader, its disk tier now holding a copy
                disk = _timed_load(loader, manifest)
                result.sample(f"{name}.s3_s", s3)
                result.sample(f"{name}.disk_s", disk)
                result.sample(f"{name}.ram_s", ram)
                result.sample(f"{name}.ram_over_disk", ram / disk)
                result.sample(f"{name}.ram_over_s3", ram / s3)
                harness.progress(
                    f"run {run + 1}/{args.runs} {name}: S3 {s3 * 1000:.0f} ms, "
                    f"disk {disk * 1000:.0f} ms, RAM {ram * 1000:.0f} ms"
                )
        result.finish_medians()
        for name in models:
            result.goal(
                f"RAM-tier reload/disk-tier reload {name}",
                result.medians[f"{name}.ram_over_disk"],
                "<=",
                0.5,
            )
            result.notes[f"{name}.ram_over_s3"] = result.medians[f"{name}.ram_over_s3"]
    result.write(args.out)


if __name__ == "__main__":
    main()
