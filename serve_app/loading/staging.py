"""Host-to-device copies of model weights through pinned staging buffers (GPU replicas).

Weights arrive as views of ordinary (pageable) host buffers. A copy from pageable memory
is synchronous and bounced through the driver; `HostToDevice` instead owns a few pinned
staging buffers, allocated once per replica, and streams every tensor through them on a
side CUDA stream: while the GPU copies one staging buffer to the device (DMA, async), the
CPU fills the next. Only used when `torch.cuda.is_available()`.
"""

from __future__ import annotations

import threading

import torch

DEFAULT_STAGING_BYTES = 32 * 2**20


class HostToDevice:
    """Copies a state dict to one CUDA device through `slots` pinned buffers."""

    def __init__(
        self, device: torch.device, staging_bytes: int = DEFAULT_STAGING_BYTES, slots: int = 2
    ) -> None:
        if device.type != "cuda":
            raise ValueError("HostToDevice copies to a CUDA device")
        self.device = device
        self._stream = torch.cuda.Stream(device)
        self._slots = [
            torch.empty(staging_bytes, dtype=torch.uint8).pin_memory() for _ in range(slots)
        ]
        self._done: list[torch.cuda.Event | None] = [None] * slots
        # NOTE: one load at a time uses the staging buffers; others wait (copies are fast).
        self._lock = threading.Lock()

    def copy(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Device copies of every tensor in `state` (tensors that share storage, like tied
        weights, stay shared). Returns once every copy has landed on the device."""
        out: dict[str, torch.Tensor] = {}
        copied: dict[tuple[int, tuple[int, ...], torch.dtype], torch.Tensor] = {}
        slot = 0
        with self._lock, torch.cuda.stream(self._stream):
            for name, tensor in state.items():
                key = (tensor.data_ptr(), tuple(tensor.shape), tensor.dtype)
                if key in copied and tensor.numel():
                    out[name] = copied[key]
                    continue
                dst = torch.empty(tensor.shape, dtype=tensor.dtype, device=self.device)
                src = tensor.contiguous().reshape(-1).view(torch.uint8)
                flat = dst.reshape(-1).view(torch.uint8)
                for start in range(0, src.numel(), self._slots[0].numel()):
                    n = min(self._slots[0].numel(), src.numel() - start)
                    done = self._done[slot]
                    if done is not None:
                        done.synchronize()  # the DMA out of this slot has finished
                    staged = self._slots[slot][:n]
                    staged.copy_(src[start : start + n])
                    flat[start : start + n].copy_(staged, non_blocking=True)
                    event = torch.cuda.Event()
                    event.record(self._stream)
                    self._done[slot] = event
                    slot = (slot + 1) % len(self._slots)
                out[name] = copied[key] = dst
            self._stream.synchronize()
        return out
