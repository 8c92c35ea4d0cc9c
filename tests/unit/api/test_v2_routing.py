"""V2 goes through the same routing as the native API (issue 15 §3): aliases with sticky
keys and shadows, default versions, `id@version`, through the real app."""

from __future__ import annotations

import asyncio

import httpx
import numpy as np
import tritonclient.http as triton

from serve_app.api.app import create_app
from serve_app.config import IngressConfig, PoolConfig, RoutingConfig
from serve_app.gateway.gateway import Gateway
from serve_app.gateway.routing_table import RoutingTable
from serve_app.host.model_host import ModelHost
from serve_app.schemas import PredictCall, PredictResponse
from serve_app.storage.registry import Registry

ROW = [0.1, -0.2, 0.3, 0.4]
ALIASES = {
    "ab": {
        "arms": [{"target": "m-a@1", "weight": 50}, {"target": "m-b@1", "weight": 50}],
        "shadow": {"target": "m-a@2"},
    }
}


def infer_body(binary: bool = False) -> tuple[bytes, dict[str, str]]:
    """A tritonclient-encoded request (the client's own encoder) for one tabular row."""
    tensor = triton.InferInput("input", [1, 4], "FP32")
    tensor.set_data_from_numpy(np.array([ROW], dtype=np.float32), binary_data=binary)
    outputs = [triton.InferRequestedOutput("score", binary_data=False)]
    body, length = triton.InferenceServerClient.generate_request_body([tensor], outputs)
    return body, {} if length is None else {"Inference-Header-Content-Length": str(length)}


async def test_v2_uses_aliases_sticky_keys_shadows_and_default_versions(
    published, host: ModelHost
) -> None:
    calls: list[str] = []

    async def dispatch(call: PredictCall) -> PredictResponse:
        calls.append(f"{call.manifest.key}:{call.request_id.endswith('-shadow')}")
        return await host.predict(call)

    registry = Registry(published, refresh_s=60)
    registry.refresh()
    gateway = Gateway(registry, dispatch, IngressConfig())
    routing = RoutingConfig.model_validate({"aliases": ALIASES, "default_versions": {"m-a": "1"}})
    gateway.set_routing(RoutingTable(routing, [PoolConfig()], registry))
    app = create_app(gateway, max_body_bytes=64 * 1024)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://f") as c:
        body, headers = infer_body(binary=True)
        arms = set()
        for _ in range(6):
            r = await c.post(
                "/v2/models/ab/infer", content=body, headers={**headers, "X-User-Id": "carol"}
            )
            assert r.status_code == 200, r.text
            arms.add((r.headers["X-Fleet-Arm"], r.json()["model_name"]))
        assert len(arms) == 1  # sticky: one arm for one key
        ((arm, name),) = arms
        assert arm.startswith(name + "@")
        # the default version (1, not the latest 2) and an explicit id@version
        default = await c.post("/v2/models/m-a/infer", content=body, headers=headers)
        assert default.json()["model_version"] == "1"
        pinned = await c.post("/v2/models/m-a@2/infer", content=body, headers=headers)
        assert pinned.json()["model_version"] == "2"
        assert (await c.get("/v2/models/m-a")).json()["inputs"][0]["shape"] == [-1, 4]
        assert (await c.get("/v2/models/ab/ready")).json()["ready"] is True
        for _ in range(100):  # the shadow copies run in the background
            if sum(c.endswith(":True") for c in calls) == 6:
                break
            await asyncio.sleep(0.05)
        report = (await c.get("/v1/routing")).json()
    assert sum(c == "m-a@2:True" for c in calls) == 6  # every aliased request was shadowed
    served = {a["arm"]: a["requests"] for a in report["arms"] if a["role"] == "serve"}
    assert served == {arm: 6}
