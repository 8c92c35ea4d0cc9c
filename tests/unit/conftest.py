"""Unit fixtures: an in-memory store, small real models, a host and the ASGI app over them."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import fsspec
import httpx
import pytest

from devstack.demo_fleet import write_fraud_model
from serve_app.api.app import create_app
from serve_app.config import HostConfig, IngressConfig, StoreConfig
from serve_app.gateway.gateway import Gateway
from serve_app.host.model_host import ModelHost
from serve_app.storage.publisher import publish_path
from serve_app.storage.registry import Registry
from serve_app.storage.store import ModelStore
from tests.support import MB, SMALL


@pytest.fixture
def store() -> ModelStore:
    """A ModelStore over fsspec's in-memory filesystem, under a fresh prefix."""
    fs = fsspec.filesystem("memory", skip_instance_cache=True)
    config = StoreConfig(url=f"s3://fleet/unit-{uuid.uuid4().hex[:8]}", chunk_bytes=1024)
    return ModelStore(config, fs=fs)


@pytest.fixture
def published(store: ModelStore, tmp_path: Path) -> ModelStore:
    """Two small tabular models: `m-a` (versions 1, 2) and `m-b` (version 1)."""
    for model_id, seed in (("m-a", 1), ("m-b", 2)):
        src = write_fraud_model(tmp_path / f"{model_id}-1", 0, seed, SMALL)
        publish_path(store, src, model_id, "1")
    src = write_fraud_model(tmp_path / "m-a-2", 0, 3, SMALL)
    publish_path(store, src, "m-a", "2")
    return store


@pytest.fixture
def host(published: ModelStore, tmp_path: Path) -> ModelHost:
    config = HostConfig(memory_budget=MB, disk_cache_dir=str(tmp_path / "disk"), accelerator="cpu")
    return ModelHost(config, published, replica="unit")


@pytest.fixture
def gateway(published: ModelStore, host: ModelHost) -> Gateway:
    registry = Registry(published, refresh_s=60)
    registry.refresh()
    return Gateway(registry, host.predict, IngressConfig(max_batch_rows=100))


@pytest.fixture
async def client(gateway: Gateway) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(gateway, max_body_bytes=64 * 1024)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://fleet") as c:
        yield c
