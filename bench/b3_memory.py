"""B3: peak RSS increase during a cold load / model bytes (and steady increase after it).

A 256 MB torch MLP loaded from S3 with `ModelLoader.load` (empty disk tier each run). RSS of
this process is sampled every 5 ms during the load; the increase is measured from the RSS
just before the load (heap trimmed). Goal: peak <= 1.15x model bytes.
"""

from __future__ import annotations

import tempfile
import threading
from pathlib import Path

from bench import harness


def main() -> None:
    args = harness.parse_args(__doc__.split("\n")[0])
    import torch

    from serve_app.loading.disk_tier import DiskTier
    from serve_app.loading.loader import ModelLoader
    from serve_app.storage.publisher import publish_path

    torch.set_num_threads(1)
    result = harness.Result("b3_memory", args.runs)
    work = Path(tempfile.mkdtemp(prefix="fleet-b3-"))
    with harness.local_s3() as store:
        manifest = publish_path(store, harness.write_mlp(work / "m256", 256), "mlp-256", "1")
        nbytes = manifest.weight_bytes
        warm = ModelLoader(store, DiskTier(work / "warm", 2**34), torch.device("cpu"))
        del warm  # imports done; the first load below is cold from S3 like every other
        for run in range(args.runs):
            loader = ModelLoader(store, DiskTier(work / f"d{run}", 2**34), torch.device("cpu"))
            harness.trim_heap()
            before = harness.rss_bytes()
            with harness.PeakSampler([harness.PeakSampler.self_pid()]) as sampler:
                predictor = loader.load(manifest)
                for thread in threading.enumerate():
                    if thread.name.startswith("disk-tier:"):
                        thread.join()
            harness.trim_heap()
            after = harness.rss_bytes()
            peak = max(sampler.peaks.values())
            result.sample("peak_over_bytes", (peak - before) / nbytes)
            result.sample("steady_over_bytes", (after - before) / nbytes)
            harness.progress(
                f"run {run + 1}/{args.runs}: peak +{(peak - before) / 1e6:.0f} MB, "
                f"steady +{(after - before) / 1e6:.0f} MB for {nbytes / 1e6:.0f} MB of weights"
            )
            del predictor
            harness.trim_heap()
        result.finish_medians()
        result.notes["bytes"] = nbytes
        result.goal(
            "B3 peak RSS increase/model bytes", result.medians["peak_over_bytes"], "<=", 1.15
        )
        result.goal(
            "B3 steady RSS increase/model bytes", result.medians["steady_over_bytes"], "<=", 1.05
        )
    result.write(args.out)


if __name__ == "__main__":
    main()
