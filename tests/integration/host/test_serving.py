"""Real Ray Serve + real SeaweedFS + real models: answers, budget, evictions, routing."""

from __future__ import annotations

import random
import time
from collections import Counter

import httpx

from serve_app.api.app import MODEL_ID_HEADER
from serve_app.storage.manifest import Manifest
from tests.integration.reference import assert_same, expected, inputs_for
from tests.support import BUDGET, FleetApp, fraud_ids, wait_for


def resident_map(app: FleetApp) -> dict[str, list[str]]:
    """key -> replicas that hold it, from every live host replica's own report."""
    holders: dict[str, list[str]] = {}
    for replica in app.replicas():
        for model in replica["models"]:
            holders.setdefault(model["key"], []).append(replica["replica"])
    return holders


def check_budget(app: FleetApp) -> list[dict]:
    replicas = app.replicas()
    for r in replicas:
        assert r["budget_bytes"] == BUDGET
        assert r["resident_bytes"] <= BUDGET, r
        assert r["peak_resident_bytes"] <= BUDGET, r
    return replicas


def test_churn_every_answer_matches_direct_loading(
    app: FleetApp, fleet: dict[str, Manifest]
) -> None:
    """Skewed traffic over a fleet 3x+ the budget: correct answers, budget kept, evictions."""
    keys = sorted(fleet)
    rng = random.Random(7)
    hot = keys[:5]
    order = keys + [rng.choice(hot) for _ in range(40)] + rng.sample(keys, len(keys))
    rng.shuffle(order)
    served: Counter[str] = Counter()
    started = time.monotonic()
    for key in order:
        model_id, _, version = key.partition("@")
        kwargs = {"version": version}
        inputs = inputs_for(model_id)
        response = app.predict(model_id, inputs, **kwargs)
        assert response.status_code == 200, (key, response.text)
        body = response.json()
        assert body["model_id"] == model_id
        assert body["version"] == fleet[key].version
        assert_same(key, body["outputs"], expected(model_id, inputs))
        served[body["replica"]] += 1
        # a repeat right away is a hit on the replica that holds the model
        again = app.predict(model_id, inputs, **kwargs)
        assert again.status_code == 200
        assert again.json()["resident"] is True, key
        assert again.headers["X-Fleet-Cache"] == "hit"
        assert again.json()["replica"] == body["replica"], key
        check_budget(app)
    replicas = check_budget(app)
    evictions = sum(r["evictions"] for r in replicas)
    assert evictions > 0
    assert len(served) == 2, "both host replicas served traffic"
    print(
        f"\nchurn: {2 * len(order)} requests over {len(keys)} model versions in "
        f"{time.monotonic() - started:.1f}s; evictions={evictions}; "
        + "; ".join(
            f"{r['replica']}: resident {r['resident_bytes'] / 1e6:.1f} MB / budget "
            f"{r['budget_bytes'] / 1e6:.1f} MB (peak {r['peak_resident_bytes'] / 1e6:.1f})"
            for r in replicas
        )
    )


def test_router_sends_requests_where_the_model_is(
    app: FleetApp, fleet: dict[str, Manifest]
) -> None:
    """Models held by one replica are served by it; evicted ones stop attracting traffic."""
    # load a spread of small models, then push them out of one replica with big ones
    for model_id in fraud_ids()[:6]:
        assert app.predict(model_id, inputs_for(model_id)).status_code == 200
    for model_id, version in (("minilm-embed", "1"), ("minilm-embed", "2")):
        assert app.predict(model_id, inputs_for(model_id), version=version).status_code == 200
    replicas = app.replicas()
    evicted_somewhere = {key for r in replicas for key in r["evicted"]}
    # (only the session fleet: other tests' models live here too, with other inputs)
    holders = {k: v for k, v in resident_map(app).items() if k in fleet}
    single = {k: v[0] for k, v in holders.items() if len(v) == 1}
    assert single, holders
    moved = [k for k in single if k in evicted_somewhere]
    for key, holder in single.items():
        model_id, _, version = key.partition("@")
        for _ in range(3):
            body = app.predict(model_id, inputs_for(model_id), version=version).json()
            assert (body["replica"], body["resident"]) == (holder, True), (key, holders)
    # a model evicted everywhere is loaded again (a miss), not "found" on a stale replica
    gone = [k for k in evicted_somewhere if k not in holders and k in fleet]
    for key in gone[:3]:
        model_id, _, version = key.partition("@")
        body = app.predict(model_id, inputs_for(model_id), version=version).json()
        assert body["resident"] is False, key
    print(f"\nrouting: {len(single)} single-holder models checked, {len(moved)} had moved")


def test_header_route_and_handle_equivalence(app: FleetApp) -> None:
    model_id = fraud_ids()[7]
    by_path = app.predict(model_id, inputs_for(model_id)).json()
    by_header = httpx.post(
        f"{app.url}/v1/predict",
        json={"inputs": inputs_for(model_id)},
        headers={MODEL_ID_HEADER: model_id},
        timeout=60,
    ).json()
    assert by_header["outputs"] == by_path["outputs"]
    assert by_header["model_id"] == model_id


def test_listing_manifest_health_docs(app: FleetApp, fleet: dict[str, Manifest]) -> None:
    listing = httpx.get(f"{app.url}/v1/models", timeout=30).json()
    ids = {m["model_id"] for m in listing["models"]}
    assert {m.model_id for m in fleet.values()} <= ids
    embed = next(m for m in listing["models"] if m["model_id"] == "minilm-embed")
    assert embed["versions"] == ["1", "2"]
    detail = httpx.get(f"{app.url}/v1/models/minilm-embed", timeout=30).json()
    assert detail["manifest"]["version"] == "2"
    assert detail["manifest"]["task"] == "text-embedding"
    assert {f["path"] for f in detail["manifest"]["files"]} >= {"model.safetensors", "config.json"}
    assert detail["manifest"]["framework"]["torch"]
    assert httpx.get(f"{app.url}/healthz", timeout=30).json()["status"] == "ok"
    assert httpx.get(f"{app.url}/docs", timeout=30).status_code == 200
    assert "/v1/predict" in httpx.get(f"{app.url}/openapi.json", timeout=30).json()["paths"]


def test_model_published_after_deploy_is_servable(app: FleetApp, store, tmp_path) -> None:
    """No redeploy: the registry refresh (1 s here) picks the new model up."""
    from devstack.demo_fleet import write_fraud_model
    from serve_app.storage.publisher import publish_path

    model_id = f"late-{int(time.time())}"
    src = write_fraud_model(tmp_path / model_id, 3)
    publish_path(store, src, model_id)
    published = time.monotonic()

    def servable() -> bool:
        return app.predict(model_id, inputs_for("fraud-x")).status_code == 200

    wait_for(servable, 30, f"{model_id} to become servable")
    took = time.monotonic() - published
    refresh = app.config.ingress.registry_refresh_s
    assert took <= refresh + 5.0
    print(f"\nnew model servable {took:.2f}s after publish (refresh interval {refresh}s)")
