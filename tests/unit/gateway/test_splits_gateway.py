"""Gateway over a real host: alias splits name their arm (body and header), shadow copies run
off the request's path with their latency and errors recorded, pins stay resident."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import pytest

from serve_app.api.app import create_app
from serve_app.api.native import ARM_HEADER
from serve_app.config import HostConfig, IngressConfig, PoolConfig, RoutingConfig
from serve_app.errors import PinRefused
from serve_app.gateway.gateway import Gateway
from serve_app.gateway.routing_table import RoutingTable
from serve_app.host.model_host import ModelHost
from serve_app.schemas import PredictCall, PredictResponse
from serve_app.storage.registry import Registry
from serve_app.storage.store import ModelStore

ROW = [[0.1, -0.2, 0.3, 0.4]]
SPLIT = {
    "ab": {
        "arms": [{"target": "m-a@1", "weight": 50}, {"target": "m-a@2", "weight": 50}],
        "shadow": {"target": "m-b@1"},
    }
}


def routed(gateway: Gateway, **routing: object) -> Gateway:
    gateway.set_routing(
        RoutingTable(RoutingConfig.model_validate(routing), [PoolConfig()], gateway.registry)
    )
    return gateway


async def test_http_names_the_arm_and_keeps_a_sticky_caller(gateway: Gateway) -> None:
    routed(gateway, aliases=SPLIT)
    app = create_app(gateway, max_body_bytes=64 * 1024)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://f") as c:
        arms = set()
        for _ in range(5):
            r = await c.post(
                "/v1/models/ab/predict", json={"inputs": ROW}, headers={"X-User-Id": "alice"}
            )
            assert r.status_code == 200, r.text
            body = r.json()
            assert body["alias"] == "ab"
            assert r.headers[ARM_HEADER] == body["arm"] == f"{body['model_id']}@{body['version']}"
            arms.add(body["arm"])
        assert len(arms) == 1  # sticky
        by_version = await c.post("/v1/models/m-a@1/predict", json={"inputs": ROW})
        assert by_version.json()["version"] == "1"
        assert ARM_HEADER not in by_version.headers
        report = (await c.get("/v1/routing")).json()
    assert report["active"]["aliases"]["ab"]["arms"][0]["target"] == "m-a@1"
    serve_rows = [a for a in report["arms"] if a["role"] == "serve"]
    assert sum(a["requests"] for a in serve_rows) == 5


async def test_shadow_runs_off_the_request_path_and_is_recorded(
    published: ModelStore, host: ModelHost
) -> None:
    gate = asyncio.Event()

    async def dispatch(call: PredictCall) -> PredictResponse:
        if call.manifest.model_id == "m-b":  # the shadow candidate: slow, then failing
            await gate.wait()
            raise RuntimeError("candidate broke")
        return await host.predict(call)

    registry = Registry(published, refresh_s=60)
    registry.refresh()
    gateway = routed(Gateway(registry, dispatch, IngressConfig()), aliases=SPLIT)
    result = await asyncio.wait_for(gateway.predict("ab", ROW, sticky_key="bob"), timeout=30)
    assert result.arm in {"m-a@1", "m-a@2"}  # answered while the shadow is still blocked
    shadow_rows = [a for a in gateway.arm_stats.snapshot() if a["role"] == "shadow"]
    assert shadow_rows == []
    gate.set()
    while not any(a["role"] == "shadow" for a in gateway.arm_stats.snapshot()):
        await asyncio.sleep(0.01)
    (shadow,) = [a for a in gateway.arm_stats.snapshot() if a["role"] == "shadow"]
    assert (shadow["arm"], shadow["requests"], shadow["errors"]) == ("m-b@1", 1, 1)


async def test_shadow_copies_over_the_limit_are_dropped(published: ModelStore) -> None:
    gate = asyncio.Event()

    async def dispatch(call: PredictCall) -> PredictResponse:
        await gate.wait()
        return PredictResponse(
            model_id=call.manifest.model_id, version=call.manifest.version, task="t",
            outputs=[0.0], resident=True, load_wait_ms=0.0, replica="r",
        )  # fmt: skip

    registry = Registry(published, refresh_s=60)
    registry.refresh()
    gateway = routed(
        Gateway(registry, dispatch, IngressConfig()), aliases=SPLIT, shadow_max_inflight=2
    )
    calls = [asyncio.create_task(gateway.predict("ab", ROW)) for _ in range(4)]
    await asyncio.sleep(0.05)
    gate.set()
    await asyncio.gather(*calls)
    (shadow,) = [a for a in gateway.arm_stats.snapshot() if a["role"] == "shadow"]
    assert shadow["dropped"] == 2


async def test_host_pins_stay_resident_and_unpinned_ones_stay_loaded(
    published: ModelStore, tmp_path: Path
) -> None:
    registry = Registry(published, refresh_s=60)
    registry.refresh()
    a1, a2, b1 = (registry.resolve(*k) for k in (("m-a", "1"), ("m-a", "2"), ("m-b", "1")))
    budget = a1.weight_bytes + a2.weight_bytes + a1.weight_bytes // 2
    host = ModelHost(
        HostConfig(memory_budget=budget, accelerator="cpu", disk_cache_dir=str(tmp_path / "d")),
        published,
    )
    assert await host.set_pins([a1]) == {}
    assert host.cache.resident_keys() == ["m-a@1"]  # loaded by pinning
    loads = host.cache.stats.loads
    for manifest in (a2, b1, a2, b1):  # churn through the rest of the budget
        await host.predict(PredictCall(manifest=manifest, inputs=ROW, request_id="x"))
    assert "m-a@1" in host.cache.resident_keys()
    assert host.status()["pinned"] == ["m-a@1"]
    # moving the pin: m-a@1 stays resident (no reload), m-b@1 becomes the pin
    loads = host.cache.stats.loads
    await host.set_pins([b1])
    assert host.cache.pinned_keys() == ["m-b@1"]
    assert host.cache.stats.loads - loads <= 1  # at most m-b@1, if it had been evicted
    assert "m-a@1" in host.cache.resident_keys() or host.cache.stats.evictions > 0
    with pytest.raises(PinRefused):
        host.cache.pin("m-x@1", budget)
    await host.close()
    small = ModelHost(
        HostConfig(
            memory_budget=int(a1.total_bytes * 1.2),  # every file counts (issue 6 #3)
            accelerator="cpu",
            disk_cache_dir=str(tmp_path / "d2"),
        ),
        published,
    )
    errors = await small.set_pins([a1, a2, b1])  # more than fits: the first applies
    assert sorted(errors) == ["m-a@2", "m-b@1"]
    assert all("over this replica's memory budget" in e for e in errors.values())
    assert small.cache.pinned_keys() == ["m-a@1"]
    assert small.status()["pin_errors"] == errors
    await small.close()
