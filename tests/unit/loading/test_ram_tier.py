"""The host-RAM tier: verified buffers of recently loaded versions under their own byte
budget, and the loader reloading from it with neither S3 nor the disk tier."""

from __future__ import annotations

import shutil
import threading
from pathlib import Path

import pytest
import torch

from devstack.demo_fleet import TEXT_CLASSIFIERS, write_text_classifier
from serve_app.config import HostConfig
from serve_app.errors import ArtifactCorrupt
from serve_app.loading.disk_tier import DiskTier
from serve_app.loading.loader import ModelLoader
from serve_app.loading.ram_tier import RamTier
from serve_app.storage.publisher import publish_path
from serve_app.storage.store import ModelStore


def buffers(*sizes: int) -> dict[str, bytearray]:
    return {f"f{i}.safetensors": bytearray(size) for i, size in enumerate(sizes)}


def test_least_recently_used_versions_leave_first_within_the_budget() -> None:
    tier = RamTier(100)
    assert tier.put("a@1", buffers(40))
    assert tier.put("b@1", buffers(30, 10))
    assert tier.get("a@1") is not None  # a is now the most recently used
    assert tier.put("c@1", buffers(50))  # b (40) leaves, a (40) + c (50) stay
    status = tier.status()
    assert status["models"] == ["a@1", "c@1"]
    assert status["bytes"] == 90
    assert tier.get("b@1") is None
    assert (tier.stats.hits, tier.stats.misses, tier.stats.evictions) == (1, 1, 1)


def test_a_version_over_the_whole_budget_is_not_held() -> None:
    tier = RamTier(100)
    assert tier.put("a@1", buffers(60))
    assert not tier.put("big@1", buffers(101))
    assert tier.status()["models"] == ["a@1"]
    assert tier.put("a@1", buffers(70))  # replacing a version counts it once
    assert tier.status()["bytes"] == 70


def test_concurrent_puts_never_exceed_the_budget() -> None:
    tier = RamTier(1000)
    seen: list[int] = []

    def work(n: int) -> None:
        for i in range(200):
            tier.put(f"m{n}-{i % 17}@1", buffers(10 + (i * 37 + n) % 300))
            seen.append(int(tier.status()["bytes"]))  # type: ignore[arg-type]

    threads = [threading.Thread(target=work, args=(n,)) for n in range(4)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert max(seen) <= 1000


def _loader(store: ModelStore, root: Path, ram_bytes: int) -> ModelLoader:
    config = HostConfig(memory_budget="1GB", disk_cache_dir=str(root), ram_cache_bytes=ram_bytes)
    return ModelLoader.from_config(store, config, torch.device("cpu"))


def _wait_for_disk_writes() -> None:
    for thread in threading.enumerate():
        if thread.name.startswith("disk-tier:"):
            thread.join(30)


@pytest.mark.parametrize("model", ["tabular", "text"])
def test_a_reload_comes_from_ram_with_s3_and_disk_gone(
    published: ModelStore, tmp_path: Path, model: str
) -> None:
    if model == "text":
        spec = TEXT_CLASSIFIERS[0]
        publish_path(published, write_text_classifier(tmp_path / "src", spec), spec.model_id, "1")
        manifest, inputs = published.read_manifest(spec.model_id, "1"), ["great stuff", "bad"]
    else:
        manifest, inputs = published.read_manifest("m-a", "1"), [[0.5] * 4, [1.0] * 4]
    loader = _loader(published, tmp_path / "disk", 2**30)
    first = loader.load(manifest)
    expected = first.predict(inputs)
    first.close()  # evicted from the device
    _wait_for_disk_writes()
    shutil.rmtree(tmp_path / "disk")  # no disk copy ...
    published.fs.rm(published.config.url.removeprefix("s3://"), recursive=True)  # ... no S3
    again = loader.load(manifest)
    assert again.predict(inputs) == expected
    assert loader.ram is not None
    assert loader.ram.stats.hits == 1
    # without the tier the same reload has nowhere to come from: the stored artifact is gone
    with pytest.raises(ArtifactCorrupt):
        _loader(published, tmp_path / "disk2", 0).load(manifest)


def test_the_tier_is_off_by_default(published: ModelStore, tmp_path: Path) -> None:
    loader = ModelLoader(published, DiskTier(tmp_path / "d", 2**30), torch.device("cpu"))
    assert loader.ram is None
    assert _loader(published, tmp_path / "d2", 0).ram is None
