"""Tenants on real Ray Serve: an app with two tenants (and no admin key): 401, 403 and 200
on the native and V2 routes (tritonclient included), no load on a refusal, 429s for the
rate and for the cold-load cap, handle callers naming a tenant, and management closed."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import numpy as np
import pytest

from serve_app.auth.keys import hash_key
from serve_app.storage.manifest import Manifest
from tests.integration.reference import inputs_for
from tests.support import FleetApp, fraud_ids, wait_for

APP = "fleet-tenants"
KEY_A = "integration-key-of-tenant-a"
KEY_B = "integration-key-of-tenant-b"
A = {"Authorization": f"Bearer {KEY_A}"}
B = {"Authorization": f"Bearer {KEY_B}"}


def resident() -> set[str]:
    """Every model key resident on the tenants app's hosts (their own reports)."""
    from deployments.replica_directory import read_replicas

    return {m["key"] for r in read_replicas(APP, "hosts") for m in r["models"]}


@pytest.fixture(scope="module")
def tenants_url(app: FleetApp) -> Iterator[str]:
    """The app with tenants: `a` calls fraud models 30-39 (one cold load at a time), `b`
    calls fraud models 40+ and minilm-embed (2 requests/s, burst 3)."""
    from ray import serve

    from deployments.builder import build_app
    from serve_app.config import AppConfig

    ingress = app.config.ingress.model_dump()
    ingress["management"] = {}  # no admin key: management is closed
    config = AppConfig.model_validate(
        {
            "store": app.config.store.model_dump(),
            "host": {**app.config.host.model_dump(), "num_replicas": 1},
            "ingress": ingress,
            "auth": {
                "tenants": [
                    {
                        "name": "a",
                        "key_hashes": [hash_key(KEY_A)],
                        "models": ["fraud-merchant-003*"],
                        "max_cold_loads": 1,
                    },
                    {
                        "name": "b",
                        "key_hashes": [hash_key(KEY_B)],
                        "models": ["minilm-embed"],
                        "rate_per_s": 2,
                        "burst": 3,
                    },
                ]
            },
        }
    )
    serve.run(build_app(config), name=APP, route_prefix="/tenants", blocking=False)
    url = f"{app.url}/tenants"
    try:
        wait_for(
            lambda: httpx.get(f"{url}/healthz", timeout=5).status_code == 200,
            180,
            "the tenants app",
            every_s=0.5,
        )
        yield url
    finally:
        serve.delete(APP)


def predict(url: str, model: str, headers: dict[str, str], **body: Any) -> httpx.Response:
    return httpx.post(
        f"{url}/v1/models/{model}/predict",
        json={"inputs": inputs_for(model), **body},
        headers=headers,
        timeout=120,
    )


def test_401_403_200_and_no_load_on_refusal(tenants_url: str) -> None:
    import tritonclient.http as triton
    from tritonclient.utils import InferenceServerException

    model = fraud_ids()[30]
    denied = predict(tenants_url, model, {})
    assert (denied.status_code, denied.json()["code"]) == (401, "unauthorized")
    assert predict(tenants_url, model, {"Authorization": "Bearer wrong-key"}).status_code == 401
    forbidden = predict(tenants_url, model, B)
    assert (forbidden.status_code, forbidden.json()["code"]) == (403, "out_of_scope")
    unknown = predict(tenants_url, "no-such-model", B)
    assert unknown.status_code == 403
    assert unknown.json()["error"].replace("no-such-model", model) == forbidden.json()["error"]
    client = triton.InferenceServerClient(tenants_url.removeprefix("http://"))
    tensor = triton.InferInput("input", [1, 32], "FP32")
    tensor.set_data_from_numpy(np.full((1, 32), 0.1, dtype=np.float32))
    # NOTE: tritonclient adds its own headers to the dict it is given: pass copies
    for headers, status in (({}, "401"), ({**B}, "403")):
        with pytest.raises(InferenceServerException) as caught:
            client.infer(model, [tensor], headers=headers)
        assert caught.value.status() == status
    assert f"{model}@1" not in resident()  # none of the refusals loaded it
    allowed = predict(tenants_url, model, A)
    assert allowed.status_code == 200, allowed.text
    scores = client.infer(model, [tensor], headers={**A}).as_numpy("score")
    assert scores.shape == (1,)
    client.close()
    wait_for(lambda: f"{model}@1" in resident(), 10, "the allowed call's model resident")


def test_rate_limit_and_cold_load_cap_answer_429(tenants_url: str) -> None:
    # b: 2 requests/s, burst 3 (its 403s above took tokens too): once one passes, at most
    # 3 more pass in a quick row before a 429
    wait_for(
        lambda: predict(tenants_url, "minilm-embed", B).status_code == 200,
        10,
        "b's tokens back",
        every_s=0.5,
    )
    answers = [predict(tenants_url, "minilm-embed", B) for _ in range(5)]
    statuses = [r.status_code for r in answers]
    assert 429 in statuses, statuses
    assert statuses.count(200) <= 3, statuses  # never more than the burst
    throttled = next(r for r in answers if r.status_code == 429)
    assert throttled.json()["code"] == "rate_limited"
    assert int(throttled.headers["Retry-After"]) >= 1
    # a's cap: one cold model at a time; three cold models at once
    cold = [m for m in fraud_ids()[31:40] if f"{m}@1" not in resident()][:3]
    with ThreadPoolExecutor(3) as pool:
        answers = list(pool.map(lambda m: predict(tenants_url, m, A), cold))
    codes = [r.status_code for r in answers]
    assert 200 in codes, codes
    assert 429 in codes, codes
    for model, response in zip(cold, answers, strict=True):
        if response.status_code == 429:
            assert response.json()["code"] == "cold_load_limit"
            assert response.headers["Retry-After"] == "1"
            assert f"{model}@1" not in resident()  # the refused cold load never happened


def test_handles_name_a_tenant_and_management_is_closed(
    tenants_url: str, fleet: dict[str, Manifest]
) -> None:
    from ray import serve

    from serve_app.errors import OutOfScope, unwrap

    handle = serve.get_app_handle(APP)
    model = fraud_ids()[32]
    assert handle.predict.remote(model, inputs_for(model), tenant="a").result()["outputs"]
    assert handle.predict.remote(model, inputs_for(model)).result()["outputs"]  # trusted
    with pytest.raises(Exception) as caught:  # noqa: PT011 - a RayTaskError around it
        handle.predict.remote("minilm-embed", inputs_for("minilm-embed"), tenant="a").result()
    assert isinstance(unwrap(caught.value), OutOfScope)
    for method, path in [
        ("GET", "/v1/replicas"),
        ("PUT", f"/v1/models/{model}/pin"),
        ("POST", "/v2/repository/index"),
    ]:
        response = httpx.request(method, f"{tenants_url}{path}", headers=A, timeout=30)
        assert (response.status_code, response.json()["code"]) == (403, "admin_key_required")
    assert httpx.get(f"{tenants_url}/v1/stats", headers=A, timeout=30).status_code == 401
