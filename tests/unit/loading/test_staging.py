"""Pinned-staging host-to-device copies (runs only where a CUDA device is visible)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from serve_app.loading.staging import HostToDevice

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_copies_match_and_shared_storage_stays_shared() -> None:
    h2d = HostToDevice(torch.device("cuda", 0), staging_bytes=1000, slots=2)
    big = torch.randn(300, 7)  # 8400 bytes: many slots, a partial last one
    state = {
        "big": big,
        "tied": big,
        "half": torch.randn(5, dtype=torch.float16),
        "flags": torch.tensor([True, False]),
        "scalar": torch.tensor(3),
        "empty": torch.empty(0, 4),
    }
    out = h2d.copy(state)
    for name, tensor in state.items():
        assert out[name].device.type == "cuda"
        assert torch.equal(out[name].cpu(), tensor), name
    assert out["big"].data_ptr() == out["tied"].data_ptr()


def test_a_reload_from_the_ram_tier_is_a_copy_to_the_device(tmp_path: Path) -> None:
    """On a GPU replica, a model evicted from the device comes back from host RAM."""
    import fsspec

    from devstack.demo_fleet import write_fraud_model
    from serve_app.config import HostConfig, StoreConfig
    from serve_app.loading.architectures import input_width
    from serve_app.loading.loader import ModelLoader
    from serve_app.storage.publisher import publish_path
    from serve_app.storage.store import ModelStore

    store = ModelStore(
        StoreConfig(url="s3://fleet/gpu-ram-tier"),
        fs=fsspec.filesystem("memory", skip_instance_cache=True),
    )
    publish_path(store, write_fraud_model(tmp_path / "m", 0, 1), "m", "1")
    config = HostConfig(
        memory_budget="1GB", disk_cache_dir=str(tmp_path / "disk"), ram_cache_bytes="1GB"
    )
    loader = ModelLoader.from_config(store, config, torch.device("cuda", 0))
    manifest = store.read_manifest("m", "1")
    width = input_width(manifest.architecture)
    assert width is not None
    rows = [[0.5] * width]
    first = loader.load(manifest)
    expected = first.predict(rows)
    first.close()
    store.fs.rm("fleet/gpu-ram-tier", recursive=True)
    again = loader.load(manifest)
    assert again.module is not None
    assert next(again.module.parameters()).device.type == "cuda"
    assert again.predict(rows) == pytest.approx(expected)
    assert loader.ram is not None
    assert loader.ram.stats.hits == 1
