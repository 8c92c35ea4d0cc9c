"""Tenants over HTTP (the real app on a real in-process host, no Ray): 401 without a valid
key, 403 out of scope (the same for unknown models), 200 in scope, 429 over the rate, no
load on any refusal, the listing and stats by tenant."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from serve_app.api.app import create_app
from serve_app.api.auth import Authorizer
from serve_app.auth.keys import hash_key
from serve_app.auth.settings import AuthConfig
from serve_app.auth.tenants import Tenants
from serve_app.config import IngressConfig, ManagementConfig
from serve_app.gateway.gateway import Gateway
from serve_app.host.model_host import ModelHost
from serve_app.schemas import PredictCall, PredictResponse
from serve_app.storage.registry import Registry
from serve_app.storage.store import ModelStore
from tests.support import ADMIN, ADMIN_KEY

KEY_A = "tenant-a-key-0123456789abcdef"
KEY_B = "tenant-b-key-0123456789abcdef"
A = {"Authorization": f"Bearer {KEY_A}"}
B = {"Authorization": f"Bearer {KEY_B}"}
ROW = [0.1, -0.2, 0.3, 0.4]
V2_BODY = json.dumps(
    {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 4], "data": ROW}]}
)


class Dispatched:
    """The host's predict, recording every call that reached it."""

    def __init__(self, host: ModelHost) -> None:
        self.host = host
        self.keys: list[str] = []

    async def __call__(self, call: PredictCall) -> PredictResponse:
        self.keys.append(call.manifest.key)
        return await self.host.predict(call)


@pytest.fixture
def dispatched(host: ModelHost) -> Dispatched:
    return Dispatched(host)


def app_of(published: ModelStore, dispatched: Dispatched, **tenant_a: Any) -> httpx.AsyncClient:
    registry = Registry(published, refresh_s=60)
    registry.refresh()
    auth = AuthConfig.model_validate(
        {
            "tenants": [
                {"name": "a", "key_hashes": [hash_key(KEY_A)], "models": ["m-a"], **tenant_a},
                {"name": "b", "key_hashes": [hash_key(KEY_B)], "models": ["m-b"]},
            ]
        }
    )
    holder: dict[str, Gateway] = {}
    tenants = Tenants(
        auth,
        hash_key(ADMIN_KEY),
        registry,
        is_alias=lambda name: name in holder["gateway"].routing.config.aliases,
        resident=frozenset,
    )
    gateway = Gateway(
        registry,
        tenants.gate(dispatched, key_of=lambda call: call.manifest.key),
        IngressConfig(max_batch_rows=100),
    )
    holder["gateway"] = gateway
    app = create_app(
        gateway,
        64 * 1024,
        management=ManagementConfig(admin_key=ADMIN_KEY),
        auth=Authorizer(tenants),
    )
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://fleet")


@pytest.fixture
async def client(published: ModelStore, dispatched: Dispatched) -> AsyncIterator[httpx.AsyncClient]:
    async with app_of(published, dispatched) as c:
        yield c


def inference_calls(model: str) -> list[tuple[str, str, dict[str, Any]]]:
    """(method, path, request kwargs) of every inference route for `model`."""
    body = {"json": {"inputs": [ROW]}}
    return [
        ("POST", f"/v1/models/{model}/predict", body),
        ("POST", f"/v1/models/{model}/versions/1/predict", body),
        ("POST", "/v1/predict", {**body, "headers": {"serve_multiplexed_model_id": model}}),
        ("POST", f"/v2/models/{model}/infer", {"content": V2_BODY}),
        ("POST", f"/v2/models/{model}/versions/1/infer", {"content": V2_BODY}),
        ("GET", f"/v2/models/{model}", {}),
        ("GET", f"/v2/models/{model}/ready", {}),
        ("GET", f"/v1/models/{model}", {}),
    ]


async def send(
    client: httpx.AsyncClient, call: tuple[str, str, dict[str, Any]], auth: dict[str, str]
) -> httpx.Response:
    method, path, kwargs = call
    headers = {**kwargs.get("headers", {}), **auth}
    return await client.request(method, path, **{**kwargs, "headers": headers})


@pytest.mark.parametrize("index", range(8))
async def test_401_403_200_on_every_inference_route(
    client: httpx.AsyncClient, dispatched: Dispatched, host: ModelHost, index: int
) -> None:
    for auth in ({}, {"Authorization": "Bearer not-a-key-of-ours"}, {"Authorization": KEY_A}):
        denied = await send(client, inference_calls("m-a")[index], auth)
        assert denied.status_code == 401, denied.text
        assert denied.json()["code"] == "unauthorized"
    forbidden = await send(client, inference_calls("m-a")[index], B)
    assert forbidden.status_code == 403, forbidden.text
    assert forbidden.json()["code"] == "out_of_scope"
    unknown = await send(client, inference_calls("m-zzz")[index], B)
    assert unknown.status_code == 403
    assert unknown.json()["error"].replace("m-zzz", "m-a") == forbidden.json()["error"]
    assert dispatched.keys == []  # no refusal reached a host...
    assert host.cache.entries() == []  # ...or loaded anything
    for auth in (A, ADMIN):
        allowed = await send(client, inference_calls("m-a")[index], auth)
        assert allowed.status_code == 200, allowed.text
    assert KEY_A not in (await send(client, inference_calls("m-a")[index], {})).text


async def test_a_bad_body_out_of_scope_is_403_not_400(
    client: httpx.AsyncClient, dispatched: Dispatched
) -> None:
    """The check runs before the body is read."""
    for path in ("/v1/models/m-a/predict", "/v2/models/m-a/infer"):
        response = await client.post(path, content=b"{not json", headers=B)
        assert response.status_code == 403, path
    assert dispatched.keys == []


async def test_rate_limit_answers_429_with_retry_after(
    published: ModelStore, dispatched: Dispatched
) -> None:
    async with app_of(published, dispatched, rate_per_s=0.2, burst=2) as c:
        codes = [
            (await c.post("/v1/models/m-a/predict", json={"inputs": [ROW]}, headers=A))
            for _ in range(3)
        ]
        assert [r.status_code for r in codes] == [200, 200, 429]
        assert codes[2].json()["code"] == "rate_limited"
        assert int(codes[2].headers["Retry-After"]) >= 1
        other = await c.post("/v1/models/m-b/predict", json={"inputs": [ROW]}, headers=B)
        assert other.status_code == 200  # b has its own budget
        stats = (await c.get("/v1/stats", headers=ADMIN)).json()
        rows = {row["tenant"]: row for row in stats["tenants"]}
        assert (rows["a"]["ok"], rows["a"]["throttled"], rows["b"]["ok"]) == (2, 1, 1)
    assert len(dispatched.keys) == 3


async def test_listing_stats_and_routing_with_tenants(client: httpx.AsyncClient) -> None:
    assert (await client.get("/v1/models")).status_code == 401
    listing = (await client.get("/v1/models", headers=B)).json()
    assert [m["model_id"] for m in listing["models"]] == ["m-b"]
    assert listing["count"] == 1
    everything = (await client.get("/v1/models", headers=ADMIN)).json()
    assert {m["model_id"] for m in everything["models"]} == {"m-a", "m-b"}
    await client.post("/v1/models/m-a/predict", json={"inputs": [ROW]})  # 401: anonymous
    await client.post("/v1/models/m-b/predict", json={"inputs": [ROW]}, headers=A)  # 403
    for path in ("/v1/stats", "/v1/routing"):
        assert (await client.get(path, headers=A)).status_code == 401, path
    rows = {
        r["tenant"]: r for r in (await client.get("/v1/stats", headers=ADMIN)).json()["tenants"]
    }
    assert rows["anonymous"]["refused"] >= 1
    assert rows["a"]["refused"] == 3  # the 403 and its two tries of the admin views
    assert (await client.get("/v1/routing", headers=ADMIN)).status_code == 200
