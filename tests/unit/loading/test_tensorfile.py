"""Zero-copy safetensors views: same tensors as safetensors' own loader; bad files refused."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors.torch import load, save

from serve_app.errors import ModelLoadFailed
from serve_app.loading.tensorfile import tensors_from_buffer


def test_views_equal_safetensors_and_share_the_buffer() -> None:
    tensors = {
        "w": torch.randn(7, 3),
        "b": torch.arange(5, dtype=torch.int64),
        "h": torch.randn(4, dtype=torch.bfloat16),
        "empty": torch.zeros(0, 2),
        "flag": torch.tensor([True, False]),
    }
    buf = bytearray(save(tensors))
    views = tensors_from_buffer(buf)
    reference = load(bytes(buf))
    assert set(views) == set(reference)
    for name, tensor in reference.items():
        assert views[name].dtype == tensor.dtype
        assert torch.equal(views[name], tensor), name
    views["w"][0, 0] = 42.0  # a view: writes land in the caller's buffer
    assert load(bytes(buf))["w"][0, 0].item() == 42.0


@pytest.mark.parametrize(
    "header",
    [
        {"x": {"dtype": "F32", "shape": [4], "data_offsets": [0, 8]}},  # size != shape
        {"x": {"dtype": "Q4", "shape": [1], "data_offsets": [0, 1]}},  # unknown dtype
        {"x": {"dtype": "F32", "shape": [1], "data_offsets": [0, 400]}},  # past the end
    ],
)
def test_malformed_files_are_refused(header: dict) -> None:
    raw = json.dumps(header).encode()
    buf = bytearray(struct.pack("<Q", len(raw)) + raw + bytes(16))
    with pytest.raises(ModelLoadFailed):
        tensors_from_buffer(buf)


def test_garbage_is_refused() -> None:
    with pytest.raises(ModelLoadFailed):
        tensors_from_buffer(bytearray(b"\xff" * 64))
