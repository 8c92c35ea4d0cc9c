"""Tokenizer shelf: a load (and eviction) of minilm-embed with its tokenizer shelved vs built.

The real all-MiniLM-L6-v2 published to an in-memory store, loaded by `ModelLoader.load`
from the disk tier (every file read and sha256-verified, the BERT module built) and then
evicted (`close()`), alternating in one run between:

- `built`: a shelf that keeps nothing (`TokenizerShelf(keep=0)`), i.e. what every load did
  before the shelf: build the tokenizer from its files, free it at eviction;
- `shelved`: the loader's own shelf, which kept the tokenizer that the previous (evicted)
  load released: what a reload, or a copy or fine-tune with the same tokenizer files, gets.

Reported: medians (ms) of the whole load, of its tokenizer step alone (the shelf's
`acquire`: a build, or a look-up), and of the eviction, and shelved/built of the load. The
whole-load difference is noisy on a busy box (the build's allocations also move the
garbage collector's next run); the tokenizer step is the direct measure.
"""

from __future__ import annotations

import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench import harness
from serve_app.loading.tokenizer_shelf import TokenizerKey, TokenizerLease, TokenizerShelf


class TimedShelf(TokenizerShelf):
    """A shelf that records how long each `acquire` took (ms)."""

    def __init__(self, keep: int) -> None:
        super().__init__(keep)
        self.acquire_ms: list[float] = []

    def acquire(self, key: TokenizerKey, build: Callable[[], Any]) -> TokenizerLease:
        started = time.perf_counter()
        lease = super().acquire(key, build)
        self.acquire_ms.append((time.perf_counter() - started) * 1e3)
        return lease


def main() -> None:
    args = harness.parse_args(__doc__.split("\n")[0])
    import fsspec
    import torch

    from devstack.demo_fleet import EMBEDDER_ID, minilm_dir
    from serve_app.config import StoreConfig
    from serve_app.loading.disk_tier import DiskTier
    from serve_app.loading.loader import ModelLoader
    from serve_app.storage.publisher import publish_path
    from serve_app.storage.store import ModelStore

    torch.set_num_threads(1)
    result = harness.Result("tokenizer_shelf", args.runs)
    work = Path(tempfile.mkdtemp(prefix="fleet-shelf-"))
    fs = fsspec.filesystem("memory", skip_instance_cache=True)
    store = ModelStore(StoreConfig(url="s3://fleet/bench-shelf"), fs=fs)
    shutil.copytree(minilm_dir(), work / "src")
    manifest = publish_path(store, work / "src", EMBEDDER_ID, "1")
    shelf = TimedShelf(keep=8)
    loader = ModelLoader(
        store, DiskTier(work / "disk", 2**34), torch.device("cpu"), tokenizers=shelf
    )
    loader.load(manifest).close()  # first load from the store: the disk tier has it now
    for thread in threading.enumerate():
        if thread.name.startswith("disk-tier:"):
            thread.join()
    texts = ["warm the model up", "and once more"]
    for run in range(args.runs):
        modes = ("built", "shelved") if run % 2 == 0 else ("shelved", "built")
        for mode in modes:
            timed = shelf if mode == "shelved" else TimedShelf(keep=0)
            loader.tokenizers = timed
            before = timed.builds
            started = time.perf_counter()
            predictor = loader.load(manifest)
            loaded = time.perf_counter()
            predictor.predict(texts)
            evicting = time.perf_counter()
            predictor.close()
            done = time.perf_counter()
            built = timed.builds - before
            result.sample(f"{mode}_tokenizer_ms", timed.acquire_ms[-1])
            assert built == (1 if mode == "built" else 0), (mode, built)
            result.sample(f"{mode}_load_ms", (loaded - started) * 1e3)
            result.sample(f"{mode}_evict_ms", (done - evicting) * 1e3)
            harness.progress(
                f"run {run + 1}/{args.runs} {mode}: load {(loaded - started) * 1e3:.1f} ms, "
                f"evict {(done - evicting) * 1e3:.2f} ms"
            )
    result.finish_medians()
    m = result.medians
    result.notes["saved_load_ms"] = round(m["built_load_ms"] - m["shelved_load_ms"], 2)
    result.notes["saved_tokenizer_ms"] = round(
        m["built_tokenizer_ms"] - m["shelved_tokenizer_ms"], 2
    )
    result.notes["saved_evict_ms"] = round(m["built_evict_ms"] - m["shelved_evict_ms"], 2)
    harness.progress(
        f"load: built {m['built_load_ms']:.1f} ms, shelved {m['shelved_load_ms']:.1f} ms "
        f"(saved {result.notes['saved_load_ms']:.1f} ms); tokenizer step: built "
        f"{m['built_tokenizer_ms']:.1f} ms, shelved {m['shelved_tokenizer_ms']:.2f} ms; "
        f"eviction: built "
        f"{m['built_evict_ms']:.2f} ms, shelved {m['shelved_evict_ms']:.2f} ms"
    )
    result.goal(
        "tokenizer shelf minilm-embed load shelved/built",
        m["shelved_load_ms"] / m["built_load_ms"],
        "<=",
        1.0,
    )
    result.write(args.out)
    loader.close()
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
