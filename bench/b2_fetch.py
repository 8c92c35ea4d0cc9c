"""B2: fetch throughput / a tuned reference reader, and vs s3fs's default `cat_file`.

One 512 MB weights file (a torch MLP). Per run, in the same process and alternating:
- fetch: `ModelStore.fetch` (ranged GETs into preallocated buffers, sha256 verified);
- reference: `harness.reference_read` (8 MiB ranged GETs x 4 into one buffer, no hashing);
- s3fs: `S3FileSystem().cat_file(path)` with s3fs's defaults;
- reader_no_hash (diagnostic): fetch's range reader on the same chunks, without sha256.
Goals: fetch / reference throughput >= 0.9; fetch / s3fs-default >= 1.5.
"""

from __future__ import annotations

import mmap
import os
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from bench import harness


def main() -> None:
    args = harness.parse_args(__doc__.split("\n")[0])
    import s3fs

    from serve_app.storage.publisher import publish_path

    result = harness.Result("b2_fetch", args.runs)
    work = Path(tempfile.mkdtemp(prefix="fleet-b2-"))
    with harness.local_s3() as store:
        manifest = publish_path(store, harness.write_mlp(work / "m512", 512), "mlp-512", "1")
        base = store.version_dir(manifest.model_id, manifest.version)
        default_fs = s3fs.S3FileSystem(
            endpoint_url=os.environ["AWS_ENDPOINT_URL"], skip_instance_cache=True
        )
        nbytes = manifest.total_bytes

        def s3fs_cat() -> None:
            for entry in manifest.files:
                default_fs.cat_file(f"{base}/{entry.path}")

        def reader_only() -> None:
            # diagnostic: fetch's range reader and pool layout without the sha256 pass
            chunk, deadline = store.config.chunk_bytes, time.monotonic() + 600
            with ThreadPoolExecutor(store.config.max_concurrency) as pool:
                for entry in manifest.files:
                    view = memoryview(mmap.mmap(-1, max(1, entry.size)))
                    key = f"{base}/{entry.path}"
                    list(
                        pool.map(
                            lambda at, key=key, view=view: store.reader.read_into(
                                key, at, view[at : at + chunk], deadline
                            ),
                            range(0, entry.size, chunk),
                        )
                    )

        store.fetch(manifest)  # warm-up (connections, server caches) for every reader
        harness.reference_read(store, manifest)
        s3fs_cat()
        for run in range(args.runs):
            for name, fn in (
                ("fetch", lambda: store.fetch(manifest)),
                ("reference", lambda: harness.reference_read(store, manifest)),
                ("s3fs_default", s3fs_cat),
                ("reader_no_hash", reader_only),
            ):
                harness.trim_heap()
                started = time.perf_counter()
                fn()
                seconds = time.perf_counter() - started
                result.sample(f"{name}.s", seconds)
                result.sample(f"{name}.MBps", nbytes / seconds / 1e6)
                harness.progress(
                    f"run {run + 1}/{args.runs} {name}: {nbytes / seconds / 1e6:.0f} MB/s"
                )
        result.finish_medians()
        result.notes["bytes"] = nbytes
        result.notes["chunk_bytes"] = store.config.chunk_bytes
        result.notes["max_concurrency"] = store.config.max_concurrency
        fetch = result.medians["fetch.MBps"]
        result.goal("B2 fetch/reference", fetch / result.medians["reference.MBps"], ">=", 0.9)
        result.goal("B2 fetch/s3fs-default", fetch / result.medians["s3fs_default.MBps"], ">=", 1.5)
    result.write(args.out)


if __name__ == "__main__":
    main()
