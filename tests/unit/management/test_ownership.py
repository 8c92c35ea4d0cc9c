"""Management fails closed, and pins have owners: an API unpin/unload never removes a
config pin, and a refused pin's rollback removes only what it added (two real in-process
hosts, no Ray)."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
from pydantic import ValidationError

from serve_app.api.app import create_app
from serve_app.api.management import ManagementGuard
from serve_app.config import AppConfig, HostConfig, IngressConfig, ManagementConfig
from serve_app.gateway.gateway import Gateway
from serve_app.host.model_host import ModelHost
from serve_app.management.manager import ModelManager
from serve_app.management.pins import MemoryKeyValue, PinStore
from serve_app.storage.registry import Registry
from serve_app.storage.store import ModelStore
from tests.support import ADMIN, ADMIN_KEY, LocalHostControl

BUDGET = 800  # bytes: one tiny model's pin fits, two do not


@pytest.fixture
def registry(published: ModelStore) -> Registry:
    registry = Registry(published, refresh_s=60)
    registry.refresh()
    return registry


@pytest.fixture
def control(published: ModelStore, tmp_path: Path) -> LocalHostControl:
    def host(name: str) -> ModelHost:
        config = HostConfig(
            memory_budget=BUDGET, disk_cache_dir=str(tmp_path / name), accelerator="cpu"
        )
        return ModelHost(config, published, replica=name)

    return LocalHostControl({n: host(n) for n in ("r1", "r2")})


def client_of(
    registry: Registry, control: LocalHostControl, pins: PinStore, config: ManagementConfig
) -> httpx.AsyncClient:
    gateway = Gateway(registry, control.hosts["r1"].predict, IngressConfig(max_batch_rows=100))
    app = create_app(
        gateway, 64 * 1024, manager=ModelManager(registry, control, pins), management=config
    )
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://fleet")


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/v1/replicas"),
        ("POST", "/v1/models/m-a/load"),
        ("POST", "/v1/models/m-a/unload"),
        ("PUT", "/v1/models/m-a/pin"),
        ("DELETE", "/v1/models/m-a/pin"),
        ("POST", "/v2/repository/index"),
        ("POST", "/v2/repository/models/m-a/load"),
        ("POST", "/v2/repository/models/m-a/unload"),
    ],
)
async def test_no_admin_key_means_403(
    registry: Registry,
    control: LocalHostControl,
    method: str,
    path: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("FLEET_ADMIN_KEY", raising=False)
    pins = PinStore(MemoryKeyValue(), "fleet")
    async with client_of(registry, control, pins, ManagementConfig()) as c:
        response = await c.request(method, path)
        assert response.status_code == 403, response.text
        assert response.json()["code"] == "admin_key_required"
        assert (await c.get("/v1/models/m-a")).json()["residency"] is None
    assert control.delivered == []  # nothing reached a host


async def test_allow_unauthenticated_opens_management(
    registry: Registry, control: LocalHostControl, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("FLEET_ADMIN_KEY", raising=False)
    pins = PinStore(MemoryKeyValue(), "fleet")
    config = ManagementConfig(allow_unauthenticated=True)
    async with client_of(registry, control, pins, config) as c:
        assert (await c.post("/v1/models/m-a/load")).status_code == 200


def test_short_admin_keys_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValidationError, match="16 characters"):
        AppConfig.model_validate({"ingress": {"management": {"admin_key": "short-key"}}})
    monkeypatch.setenv("FLEET_ADMIN_KEY", "short-key")
    with pytest.raises(ValueError, match="FLEET_ADMIN_KEY is shorter"):
        ManagementGuard(ManagementConfig())
    monkeypatch.setenv("FLEET_ADMIN_KEY", ADMIN_KEY)
    assert ManagementGuard(ManagementConfig()).key_hash is not None


async def test_api_unpin_and_unload_never_remove_a_config_pin(
    registry: Registry, control: LocalHostControl
) -> None:
    pins = PinStore(MemoryKeyValue(), "fleet")
    r1, r2 = control.hosts["r1"], control.hosts["r2"]
    await r1.set_pins([registry.resolve("m-b", "1")])  # config pin on r1 only
    async with client_of(registry, control, pins, ManagementConfig(admin_key=ADMIN_KEY)) as c:
        pinned = await c.put("/v1/models/m-b/pin", headers=ADMIN)
        assert pinned.status_code == 200, pinned.text
        unpinned = await c.delete("/v1/models/m-b/pin", headers=ADMIN)
        assert unpinned.status_code == 200, unpinned.text
        by_replica = {r["replica"]: r for r in unpinned.json()["replicas"]}
        assert by_replica["r1"]["code"] == "pinned_by_config"
        assert by_replica["r2"]["ok"]
        assert not by_replica["r2"]["pinned"]
        assert r1.cache.is_pinned("m-b@1")
        assert not r2.cache.is_pinned("m-b@1")
        unloaded = await c.post("/v1/models/m-b/unload", headers=ADMIN)
        assert unloaded.status_code == 200, unloaded.text
        assert r1.cache.is_pinned("m-b@1")
        assert "m-b@1" in r1.cache
        assert "m-b@1" not in r2.cache
        alone = await c.post("/v1/models/m-b/unload", headers=ADMIN, params={"version": "1"})
        assert alone.status_code == 200  # r2 unloaded it (nothing there), r1 refused
    assert pins.list() == []


async def test_refused_pin_rolls_back_only_what_it_added(
    registry: Registry, control: LocalHostControl
) -> None:
    pins = PinStore(MemoryKeyValue(), "fleet")
    r1, r2 = control.hosts["r1"], control.hosts["r2"]
    await r1.set_pins([registry.resolve("m-b", "1")])  # r1: m-b pinned by config
    await r2.set_pins([registry.resolve("m-a", "1")])  # r2: full with m-a's pin
    async with client_of(registry, control, pins, ManagementConfig(admin_key=ADMIN_KEY)) as c:
        refused = await c.put("/v1/models/m-b/pin", headers=ADMIN)
        assert refused.status_code == 507, refused.text
    assert r1.cache.pinned_keys() == ["m-b@1"]  # the config pin survives the rollback
    assert r2.cache.pinned_keys() == ["m-a@1"]
    assert pins.list() == []
    assert ("r1", "unpin", "m-b@1") not in control.delivered


async def test_refused_pin_keeps_an_earlier_api_pin_record(
    registry: Registry, control: LocalHostControl
) -> None:
    """A pin record that was there before the refused call stays (only r2 refuses)."""
    from serve_app.management.pins import PinRecord

    pins = PinStore(MemoryKeyValue(), "fleet")
    pins.put(PinRecord(manifest=registry.resolve("m-b", "1")))
    await control.hosts["r2"].set_pins([registry.resolve("m-a", "1")])
    async with client_of(registry, control, pins, ManagementConfig(admin_key=ADMIN_KEY)) as c:
        refused = await c.put("/v1/models/m-b/pin", headers=ADMIN)
        assert refused.status_code == 507, refused.text
    assert [r.key for r in pins.list()] == ["m-b@1"]


async def test_routing_report_hides_a_refused_config_from_non_admins(
    registry: Registry, control: LocalHostControl
) -> None:
    pins = PinStore(MemoryKeyValue(), "fleet")
    gateway = Gateway(registry, control.hosts["r1"].predict, IngressConfig(max_batch_rows=100))
    gateway.reject_routing({"aliases": {"x": "password=hunter2"}}, "aliases.x: not a dict")
    app = create_app(
        gateway,
        64 * 1024,
        manager=ModelManager(registry, control, pins),
        management=ManagementConfig(admin_key=ADMIN_KEY),
    )
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://fleet") as c:
        anonymous = await c.get("/v1/routing")
        assert anonymous.status_code == 200
        assert "hunter2" not in anonymous.text
        assert anonymous.json()["rejected"]["error"] == "aliases.x: not a dict"
        admin = (await c.get("/v1/routing", headers=ADMIN)).json()
        assert admin["rejected"]["config"] == {"aliases": {"x": "password=hunter2"}}
