"""Pinned-staging host-to-device copies (runs only where a CUDA device is visible)."""

from __future__ import annotations

import pytest
import torch

from serve_app.staging import HostToDevice

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
