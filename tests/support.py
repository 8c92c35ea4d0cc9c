"""Shared test helpers for every tier: polling, the session fleet's shape, small real test
doubles (a fake model, a gated loader, in-process host control) and a client of the app.

Fixtures live in the tiers' conftest.py files and use these; tests import from here, never
from a conftest.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from devstack.demo_fleet import TEXT_CLASSIFIERS, fraud_model_ids
from serve_app.config import AppConfig
from serve_app.loading.architectures import MlpSpec
from serve_app.storage.store import ModelStore

SMALL = MlpSpec(input_dim=4, hidden_dims=[8], output_dim=1)  # unit tests' tiny MLP
MB = 2**20
BUDGET = 95 * 10**6  # per host replica: minilm-embed (~91 MB) fits, little else beside it
FRAUD_COUNT = 40  # fraud models in the integration session's fleet
CLASSIFIERS = tuple(s for s in TEXT_CLASSIFIERS if s.model_id != "text-clf-toxicity")
# NOTE: management fails closed; the test apps configure this admin key and send it.
ADMIN_KEY = "admin-key-of-the-test-suite"
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}


def wait_for(
    condition: Callable[[], Any], timeout_s: float, what: str, every_s: float = 0.1
) -> Any:
    """Poll `condition` until it returns something truthy; fail after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        time.sleep(every_s)


def wait_healthy(url: str, timeout_s: float, what: str) -> None:
    """Poll `GET {url}/healthz` until it answers 200; fail after `timeout_s`."""

    def healthy() -> bool:
        try:
            return httpx.get(f"{url}/healthz", timeout=5).status_code == 200
        except httpx.HTTPError:
            return False

    wait_for(healthy, timeout_s, what, every_s=0.5)


@dataclass
class FleetApp:
    """The running `fleet` app: its HTTP base URL and config (with `ADMIN_KEY`)."""

    url: str
    config: AppConfig

    def manage(self, method: str, path: str, **params: Any) -> httpx.Response:
        """A management call with the admin key."""
        return httpx.request(method, f"{self.url}{path}", params=params, headers=ADMIN, timeout=120)

    def predict(self, model_id: str, inputs: list[Any], **kwargs: Any) -> httpx.Response:
        return httpx.post(
            f"{self.url}/v1/models/{model_id}/predict",
            json={"inputs": inputs, **kwargs},
            timeout=120,
        )

    def replicas(self) -> list[dict[str, Any]]:
        return httpx.get(f"{self.url}/v1/replicas", headers=ADMIN, timeout=30).json()


def publish_fresh_models(
    app: FleetApp, store: ModelStore, root: Path, ids: list[str], first_index: int
) -> None:
    """Publish small fraud-style models under new ids (no other test's traffic), version 1,
    and wait until the app's registry lists them all."""
    from devstack.demo_fleet import write_fraud_model
    from serve_app.storage.publisher import publish_path

    for i, model_id in enumerate(ids):
        publish_path(store, write_fraud_model(root / model_id, first_index + i), model_id, "1")
    wait_for(
        lambda: all(
            httpx.get(f"{app.url}/v1/models/{m}", timeout=10).status_code == 200 for m in ids
        ),
        30,
        "the new models in the registry",
    )


def fraud_ids() -> list[str]:
    return fraud_model_ids(FRAUD_COUNT)


@dataclass
class FakeModel:
    """A 'model' of a given size that records whether it was closed."""

    key: str
    size: int
    closed: bool = False

    @property
    def nbytes(self) -> int:
        return self.size

    def close(self) -> None:
        self.closed = True


@dataclass
class FakeLoader:
    """Builds FakeModels; `gate(key)` makes that key's load wait until released."""

    sizes: dict[str, int]
    calls: list[str] = field(default_factory=list)
    failures: dict[str, Exception] = field(default_factory=dict)
    gates: dict[str, asyncio.Event] = field(default_factory=dict)
    running: int = 0
    max_running: int = 0
    models: dict[str, FakeModel] = field(default_factory=dict)

    def gate(self, key: str) -> asyncio.Event:
        self.gates[key] = asyncio.Event()
        return self.gates[key]

    def __call__(self, key: str):
        async def load() -> FakeModel:
            self.calls.append(key)
            self.running += 1
            self.max_running = max(self.max_running, self.running)
            try:
                if key in self.gates:
                    await self.gates[key].wait()
                else:
                    await asyncio.sleep(0)
                if key in self.failures:
                    raise self.failures[key]
                model = FakeModel(key, self.sizes[key])
                self.models[key] = model
                return model
            finally:
                self.running -= 1

        return load


@dataclass
class LocalHostControl:
    """`HostControl` over in-process `ModelHost`s (real hosts, no Ray), keyed by replica."""

    hosts: dict
    delivered: list = field(default_factory=list)

    def replicas(self) -> list[dict]:
        return [host.status() for host in self.hosts.values()]

    async def command(self, command):
        self.delivered.append((command.replica, command.op, command.key))
        return await self.hosts[command.replica].apply(command)


def encoded_image(
    width: int, height: int, fmt: str = "PNG", mode: str = "RGB", seed: int = 0, **save: Any
) -> bytes:
    """A real image of random pixels, encoded by Pillow (`fmt`: PNG, JPEG, WEBP, ...)."""
    import io

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "RGBA": 4, "L": 1, "LA": 2, "CMYK": 4}.get(mode, 3)
    pixels = rng.integers(0, 256, (height, width, channels), dtype=np.uint8)
    if mode in ("L", "P"):
        image = Image.fromarray(pixels[..., 0], "L")
        image = image.convert("P") if mode == "P" else image
    else:
        image = Image.fromarray(pixels if channels > 1 else pixels[..., 0], mode)
    buffer = io.BytesIO()
    image.save(buffer, fmt, **save)
    return buffer.getvalue()


def claim_size(png: bytes, width: int, height: int) -> bytes:
    """`png` with its header (IHDR) rewritten to claim `width` x `height`, CRC fixed."""
    import struct
    import zlib

    ihdr = bytearray(png[16:29])
    ihdr[0:8] = struct.pack(">II", width, height)
    crc = struct.pack(">I", zlib.crc32(b"IHDR" + bytes(ihdr)) & 0xFFFFFFFF)
    return png[:16] + bytes(ihdr) + crc + png[33:]


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    """One PNG chunk: length, type, payload, CRC."""
    import struct
    import zlib

    crc = zlib.crc32(kind + payload) & 0xFFFFFFFF
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", crc)


def raw_png(width: int, height: int, depth: int, colour: int, rows: bytes) -> bytes:
    """A PNG from filtered scanlines `rows` (each starting with its filter byte)."""
    import struct
    import zlib

    ihdr = struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", ihdr)
        + png_chunk(b"IDAT", zlib.compress(rows, 9))
        + png_chunk(b"IEND", b"")
    )


def bomb_png(width: int, height: int) -> bytes:
    """A real, valid grayscale PNG of `width` x `height` black pixels: a few KB that
    inflate to width * height bytes (a decompression bomb)."""
    return raw_png(width, height, 8, 0, (b"\x00" * (width + 1)) * height)


def vision_reference(folder: Path, images: list[bytes], k: int = 5) -> list[dict[str, Any]]:
    """An image classifier run directly through transformers (its own image processor and
    model class) on encoded `images`: the top-k labels and scores per image."""
    import io

    import torch
    from PIL import Image
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    processor = AutoImageProcessor.from_pretrained(str(folder))
    model = AutoModelForImageClassification.from_pretrained(str(folder)).eval()
    pil = [Image.open(io.BytesIO(b)) for b in images]
    pixels = processor(pil, do_convert_rgb=True, return_tensors="pt")["pixel_values"]
    with torch.inference_mode():
        probs = torch.softmax(model(pixel_values=pixels).logits, dim=-1)
    out = []
    for row in probs:
        top = torch.topk(row, k)
        labels = [model.config.id2label[int(i)] for i in top.indices]
        out.append({"labels": labels, "scores": top.values.tolist()})
    return out


@contextlib.contextmanager
def running_seaweed(data_dir: Path) -> Iterator[Any]:
    """A real SeaweedFS S3 server on 127.0.0.1 with keys, the AWS_* env pointing at it
    while it runs (restored after): the S3 of a test session."""
    from devstack.seaweed import SeaweedServer

    server = SeaweedServer(data_dir)
    server.start()
    server.wait_ready(timeout_s=60)
    saved = {k: os.environ.get(k) for k in server.env()}
    os.environ.update(server.env())
    try:
        yield server
    finally:
        server.stop()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


class Traffic:
    """Client threads sending predict calls for `model_ids` (in turn) to the app at
    `base_url` until stopped; every status, and the replica that served each 200, are kept."""

    def __init__(
        self,
        base_url: str,
        model_ids: list[str],
        inputs: Callable[[str], list[Any]],
        threads: int,
        pause_s: float,
    ) -> None:
        self.base_url, self.model_ids, self.inputs, self.pause_s = (
            base_url,
            model_ids,
            inputs,
            pause_s,
        )
        self.statuses: Counter[int] = Counter()
        self.served: list[tuple[float, str, str]] = []  # (time, model, replica)
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(i,)) for i in range(threads)]

    def __enter__(self) -> Traffic:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *_: Any) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=130)

    def _run(self, offset: int) -> None:
        with httpx.Client(timeout=120) as client:
            i = offset
            while not self._stop.is_set():
                model_id = self.model_ids[i % len(self.model_ids)]
                i += 1
                response = client.post(
                    f"{self.base_url}/v1/models/{model_id}/predict",
                    json={"inputs": self.inputs(model_id)},
                )
                self.statuses[response.status_code] += 1
                if response.status_code == 200:
                    body = response.json()
                    self.served.append((time.monotonic(), model_id, body["replica"]))
                self._stop.wait(self.pause_s)


def copy_holders(replicas: list[dict[str, Any]], key: str) -> dict[str, bool]:
    """Replica -> whether it holds `key` as an extra (hot) copy, for the replicas holding it."""
    found = {}
    for replica in replicas:
        for model in replica["models"]:
            if model["key"] == key:
                found[replica["replica"]] = model["copy"]
    return found
