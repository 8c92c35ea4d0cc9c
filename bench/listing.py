"""Registry listing: CPU per refresh with the lean S3 lister / with s3fs (botocore parsing).

The registry lists the whole store every `ingress.registry_refresh_s` from a thread of the
ingress, and the CPU it spends holds the GIL the ingress's event loop needs. Each run lists
a store of `--models` versions (5 objects each, as a published text model has) both ways,
measuring the process's CPU time (s3fs parses on its own event-loop thread) and wall time; the goal
(lean <= 0.25 of s3fs) is this project's own.
"""

from __future__ import annotations

import gc
import time
from typing import Any

from bench import harness

FILES = ("manifest.json", "config.json", "model.safetensors", "tokenizer.json", "vocab.txt")


def _timed(list_fn: Any) -> tuple[float, float, int]:
    gc.collect()  # NOTE: neither way pays for the other's garbage
    cpu, wall = time.process_time(), time.perf_counter()
    found = len(list_fn())
    return time.process_time() - cpu, time.perf_counter() - wall, found


def main() -> None:
    args = harness.parse_args(
        __doc__.split("\n")[0],
        lambda p: p.add_argument("--models", type=int, default=1000, help="versions stored"),
    )
    from serve_app.storage.listing import S3Lister

    result = harness.Result("listing", args.runs)
    with harness.local_s3() as store:
        harness.progress(f"writing {args.models * len(FILES)} objects")
        objects = {f"m-{i:05d}/1/{name}" for i in range(args.models) for name in FILES}
        store.fs.pipe({f"{store.root}/{key}": b"{}" for key in objects})
        bucket, prefix = store.root.split("/", 1)
        lister = S3Lister(store.config)
        lean = lambda: lister.keys(bucket, prefix + "/")  # noqa: E731
        s3fs = lambda: store.fs.find(store.root)  # noqa: E731
        for run in range(args.runs):
            lean_cpu, lean_wall, n_lean = _timed(lean)
            s3fs_cpu, s3fs_wall, n_s3fs = _timed(s3fs)
            assert n_lean == n_s3fs == args.models * len(FILES)
            result.sample("lean_cpu_ms", lean_cpu * 1000)
            result.sample("s3fs_cpu_ms", s3fs_cpu * 1000)
            result.sample("lean_wall_ms", lean_wall * 1000)
            result.sample("s3fs_wall_ms", s3fs_wall * 1000)
            result.sample("lean_over_s3fs_cpu", lean_cpu / s3fs_cpu)
            harness.progress(
                f"run {run + 1}/{args.runs}: {n_lean} keys, CPU lean {lean_cpu * 1000:.1f} ms "
                f"vs s3fs {s3fs_cpu * 1000:.1f} ms; wall {lean_wall * 1000:.0f} vs "
                f"{s3fs_wall * 1000:.0f} ms"
            )
        result.finish_medians()
        result.goal("listing CPU lean/s3fs", result.medians["lean_over_s3fs_cpu"], "<=", 0.25)
    result.write(args.out)


if __name__ == "__main__":
    main()
