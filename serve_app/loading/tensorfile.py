"""Zero-copy tensors from a safetensors file held in memory.

A safetensors file is an 8-byte little-endian header length, a JSON header
(`{name: {"dtype", "shape", "data_offsets": [start, end]}}`) and the raw tensor bytes. The
tensors returned here are `torch.frombuffer` views of the caller's buffer: no copy, no
pickle, nothing executed.
"""

from __future__ import annotations

import json
import mmap
import struct

import torch

from serve_app.errors import ModelLoadFailed

_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
_MAX_HEADER = 100 * 2**20


def tensors_from_buffer(
    buf: bytearray | mmap.mmap, name: str = "weights"
) -> dict[str, torch.Tensor]:
    """Views of every tensor in the safetensors bytes `buf` (which they keep alive).

    Raises:
        ModelLoadFailed: the bytes are not a well-formed safetensors file.
    """
    if len(buf) < 8:
        raise ModelLoadFailed(f"{name}: not a safetensors file")
    (header_len,) = struct.unpack("<Q", bytes(buf[:8]))
    if header_len > min(_MAX_HEADER, len(buf) - 8):
        raise ModelLoadFailed(f"{name}: safetensors header length out of range")
    try:
        header = json.loads(bytes(buf[8 : 8 + header_len]))
    except ValueError as exc:
        raise ModelLoadFailed(f"{name}: unreadable safetensors header") from exc
    header.pop("__metadata__", None)
    base = 8 + header_len
    tensors: dict[str, torch.Tensor] = {}
    for key, spec in header.items():
        dtype = _DTYPES.get(spec.get("dtype"))
        start, end = spec.get("data_offsets", (0, -1))
        shape = spec.get("shape", [])
        if dtype is None or not 0 <= start <= end <= len(buf) - base:
            raise ModelLoadFailed(f"{name}: tensor {key!r} has a bad dtype or offsets")
        count = (end - start) // dtype.itemsize
        if count * dtype.itemsize != end - start or count != _numel(shape):
            raise ModelLoadFailed(f"{name}: tensor {key!r} size does not match its shape")
        if count == 0:
            tensors[key] = torch.empty(shape, dtype=dtype)
        else:
            view = torch.frombuffer(buf, dtype=dtype, offset=base + start, count=count)
            tensors[key] = view.view(shape)
    return tensors


def _numel(shape: list[int]) -> int:
    n = 1
    for dim in shape:
        n *= dim
    return n
