"""Management API and V2 routes over two real in-process hosts (no Ray): residency,
load on N replicas, pin/unpin/unload, pin refusal, pins re-applied by a new host, guard."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from serve_app.api.app import create_app
from serve_app.config import HostConfig, IngressConfig, ManagementConfig
from serve_app.gateway.gateway import Gateway
from serve_app.host.model_host import ModelHost
from serve_app.management.manager import ModelManager
from serve_app.management.pins import MemoryKeyValue, PinStore
from serve_app.storage.registry import Registry
from serve_app.storage.store import ModelStore
from tests.support import ADMIN, ADMIN_KEY, LocalHostControl

ROW = [0.1, -0.2, 0.3, 0.4]
BUDGET = (
    800  # bytes: a tiny model declares 644 B of files (196 B measured); one pin fits, two do not
)


def make_host(store: ModelStore, tmp_path: Path, name: str) -> ModelHost:
    config = HostConfig(
        memory_budget=BUDGET, disk_cache_dir=str(tmp_path / name), accelerator="cpu"
    )
    return ModelHost(config, store, replica=name)


@pytest.fixture
def control(published: ModelStore, tmp_path: Path) -> LocalHostControl:
    return LocalHostControl({n: make_host(published, tmp_path, n) for n in ("r1", "r2")})


@pytest.fixture
def pins() -> PinStore:
    return PinStore(MemoryKeyValue(), "fleet")


@pytest.fixture
def registry(published: ModelStore) -> Registry:
    registry = Registry(published, refresh_s=60)
    registry.refresh()
    return registry


def app_client(
    registry: Registry,
    control: LocalHostControl,
    pins: PinStore,
    management: ManagementConfig,
    headers: dict[str, str] | None = None,
) -> httpx.AsyncClient:
    gateway = Gateway(registry, control.hosts["r1"].predict, IngressConfig(max_batch_rows=100))
    manager = ModelManager(registry, control, pins)
    app = create_app(gateway, 64 * 1024, manager=manager, management=management)
    return httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://fleet", headers=headers
    )


@pytest.fixture
async def client(
    registry: Registry, control: LocalHostControl, pins: PinStore
) -> AsyncIterator[httpx.AsyncClient]:
    """A client of an app with the admin key configured, sending it."""
    config = ManagementConfig(admin_key=ADMIN_KEY)
    async with app_client(registry, control, pins, config, headers=ADMIN) as c:
        yield c


async def test_load_on_two_replicas_then_residency(client: httpx.AsyncClient) -> None:
    loaded = await client.post("/v1/models/m-a/load", params={"replicas": 2})
    assert loaded.status_code == 200, loaded.text
    assert sorted(r["replica"] for r in loaded.json()["replicas"]) == ["r1", "r2"]
    assert all(r["resident"] and r["bytes"] > 0 for r in loaded.json()["replicas"])
    detail = (await client.get("/v1/models/m-a")).json()
    where = {(r["replica"], r["version"]) for r in detail["residency"]}
    assert where == {("r1", "2"), ("r2", "2")}
    assert all(
        r["loaded_at"] and r["last_used"] and r["pinned"] is False for r in detail["residency"]
    )
    replicas = (await client.get("/v1/replicas")).json()
    assert {r["replica"] for r in replicas} == {"r1", "r2"}


async def test_load_prefers_the_emptiest_replica(
    client: httpx.AsyncClient, control: LocalHostControl
) -> None:
    await client.post("/v1/models/m-b/load", params={"replicas": 2})
    loaded = (await client.post("/v1/models/m-a/load")).json()
    assert len(loaded["replicas"]) == 1
    assert "m-a@2" in control.hosts[loaded["replicas"][0]["replica"]].cache


async def test_pin_unpin_unload(
    client: httpx.AsyncClient, control: LocalHostControl, pins: PinStore
) -> None:
    pinned = await client.put("/v1/models/m-b/pin")
    assert pinned.status_code == 200, pinned.text
    assert all(r["pinned"] and r["resident"] for r in pinned.json()["replicas"])
    assert [r.key for r in pins.list()] == ["m-b@1"]
    assert all(h.cache.is_pinned("m-b@1") for h in control.hosts.values())
    unpinned = await client.delete("/v1/models/m-b/pin")
    assert unpinned.status_code == 200
    assert pins.list() == []
    assert all(
        not h.cache.is_pinned("m-b@1") and "m-b@1" in h.cache for h in control.hosts.values()
    )
    await client.put("/v1/models/m-b/pin")
    unloaded = await client.post("/v1/models/m-b/unload")
    assert unloaded.status_code == 200
    assert pins.list() == []
    assert all("m-b@1" not in h.cache for h in control.hosts.values())


async def test_pin_that_cannot_fit_is_refused_and_rolled_back(
    client: httpx.AsyncClient, control: LocalHostControl, pins: PinStore
) -> None:
    assert (await client.put("/v1/models/m-a/pin", params={"version": "1"})).status_code == 200
    refused = await client.put("/v1/models/m-a/pin", params={"version": "2"})
    assert refused.status_code == 507, refused.text
    assert refused.json()["code"] == "pin_exceeds_budget"
    assert [r.key for r in pins.list()] == ["m-a@1"]
    assert all(h.cache.pinned_keys() == ["m-a@1"] for h in control.hosts.values())


async def test_a_new_host_applies_the_pin_store(
    client: httpx.AsyncClient,
    control: LocalHostControl,
    pins: PinStore,
    published: ModelStore,
    tmp_path: Path,
) -> None:
    await client.put("/v1/models/m-b/pin")
    restarted = make_host(published, tmp_path, "r3")
    await restarted.reconcile_pins(pins.list())
    assert restarted.cache.pinned_keys() == ["m-b@1"]
    assert "m-b@1" in restarted.cache
    pins.delete("m-b@1")
    await restarted.reconcile_pins(pins.list())
    assert restarted.cache.pinned_keys() == []


async def test_management_can_be_turned_off(
    registry: Registry, control: LocalHostControl, pins: PinStore
) -> None:
    async with app_client(registry, control, pins, ManagementConfig(enabled=False)) as c:
        for method, path in [
            ("GET", "/v1/replicas"),
            ("POST", "/v1/models/m-a/load"),
            ("PUT", "/v1/models/m-a/pin"),
            ("POST", "/v2/repository/index"),
        ]:
            response = await c.request(method, path)
            assert response.status_code == 403, path
            assert response.json()["code"] == "management_disabled"
        assert (await c.get("/v1/models/m-a")).json()["residency"] is None
    assert control.delivered == []


async def test_admin_key(registry: Registry, control: LocalHostControl, pins: PinStore) -> None:
    config = ManagementConfig(admin_key="s3cret-of-16-chars")
    async with app_client(registry, control, pins, config) as c:
        assert (await c.post("/v1/models/m-a/load")).status_code == 401
        wrong = {"Authorization": "Bearer nope"}
        assert (await c.post("/v1/models/m-a/load", headers=wrong)).status_code == 401
        good = {"Authorization": "Bearer s3cret-of-16-chars"}
        assert (await c.post("/v1/models/m-a/load", headers=good)).status_code == 200
        assert (await c.get("/v1/models/m-a")).json()["residency"] is None
        assert (await c.get("/v1/models/m-a", headers=good)).json()["residency"]


async def test_v2_metadata_infer_and_repository(client: httpx.AsyncClient) -> None:
    assert (await client.get("/v2")).json()["extensions"] == [
        "binary_tensor_data",
        "model_repository",
    ]
    assert (await client.get("/v2/health/ready")).status_code == 200
    meta = (await client.get("/v2/models/m-a")).json()
    assert meta["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 4]}]
    assert meta["versions"] == ["1", "2"]
    assert (await client.get("/v2/models/m-a/versions/1/ready")).json()["ready"] is True
    native = (await client.post("/v1/models/m-a/predict", json={"inputs": [ROW]})).json()
    body = {
        "id": "7",
        "inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 4], "data": ROW}],
    }
    as_json = await client.post("/v2/models/m-a/infer", content=json.dumps(body))
    assert as_json.status_code == 200, as_json.text
    assert as_json.json()["id"] == "7"
    assert as_json.json()["outputs"][0]["data"] == pytest.approx(native["outputs"], rel=1e-6)
    head = json.dumps(
        {
            "inputs": [
                {
                    "name": "input",
                    "datatype": "FP32",
                    "shape": [1, 4],
                    "parameters": {"binary_data_size": 16},
                }
            ],
            "parameters": {"binary_data_output": True},
        }
    ).encode()
    binary = await client.post(
        "/v2/models/m-a/infer",
        content=head + np.array([ROW], dtype=np.float32).tobytes(),
        headers={"Inference-Header-Content-Length": str(len(head))},
    )
    split = int(binary.headers["Inference-Header-Content-Length"])
    scores = np.frombuffer(binary.content[split:], dtype=np.float32)
    assert scores.tolist() == pytest.approx(native["outputs"], rel=1e-6)
    index = (await client.post("/v2/repository/index")).json()
    assert {"name": "m-a", "version": "2", "state": "READY", "reason": ""} in index
    assert (await client.post("/v2/repository/models/m-b/load", content=b"")).status_code == 200
    ready = (await client.post("/v2/repository/index", json={"ready": True})).json()
    assert {(e["name"], e["version"]) for e in ready} == {("m-a", "2"), ("m-b", "1")}
    assert (await client.post("/v2/repository/models/m-b/unload")).status_code == 200
    assert all(
        e["state"] != "READY"
        for e in (await client.post("/v2/repository/index")).json()
        if e["name"] == "m-b"
    )


@pytest.mark.parametrize(
    ("path", "status", "code"),
    [
        ("/v2/models/nope", 404, "model_not_found"),
        ("/v2/models/m-a/versions/9/ready", 404, "version_not_found"),
        ("/v2/models/m-a/config", 400, "not_supported"),
        ("/v2/models/stats", 400, "not_supported"),
    ],
)
async def test_v2_errors_have_an_error_field(
    client: httpx.AsyncClient, path: str, status: int, code: str
) -> None:
    response = await client.get(path)
    assert response.status_code == status
    assert response.json()["code"] == code
    assert response.json()["error"]


async def test_reconcile_keeps_going_past_a_pin_that_cannot_fit(
    registry: Registry, pins: PinStore, published: ModelStore, tmp_path: Path
) -> None:
    from serve_app.management.pins import PinRecord

    for version in ("1", "2"):
        pins.put(PinRecord(manifest=registry.resolve("m-a", version)))
    pins.put(PinRecord(manifest=registry.resolve("m-b", None)))
    host = make_host(published, tmp_path, "r9")
    await host.reconcile_pins(pins.list())
    await host.reconcile_pins(pins.list())  # the refusal is retried quietly
    pinned = host.cache.pinned_keys()
    assert 1 <= len(pinned) < 3  # not all three fit in 800 bytes; what fits is pinned
    assert host.cache.pinned_bytes <= BUDGET
    assert all(k in host.cache for k in host.cache.pinned_keys())


def test_pin_store_skips_records_it_cannot_read() -> None:
    from serve_app.management.pins import PinRecord
    from serve_app.storage.manifest import Manifest

    kv = MemoryKeyValue()
    store = PinStore(kv, "app")
    kv.put("app/pins/not-a-record", b"[]")
    manifest = Manifest.model_validate(
        {
            "model_id": "m",
            "version": "1",
            "format": "torch-module",
            "task": "tabular-classification",
            "files": [{"path": "model.safetensors", "size": 1, "sha256": "0" * 64}],
            "created_at": "2026-01-01T00:00:00+00:00",
        }
    )
    store.put(PinRecord(manifest=manifest))
    assert [r.key for r in store.list()] == ["m@1"]
