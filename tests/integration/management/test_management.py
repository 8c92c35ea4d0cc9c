"""Management API and CLI against the real stack: residency, load on N replicas, unload
with requests in flight, pins through churn, refusal, and a replica killed with `ray.kill`."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from deployments.model_host import PIN_SYNC_S
from serve_app.cli import main
from serve_app.storage.manifest import Manifest
from serve_app.storage.store import ModelStore
from tests.integration.reference import assert_same, expected, inputs_for
from tests.support import ADMIN, ADMIN_KEY, BUDGET, FleetApp, fraud_ids, wait_for


def holders(app: FleetApp, key: str) -> dict[str, dict]:
    """replica -> its entry for `key`, from every live host replica's own report."""
    return {r["replica"]: m for r in app.replicas() for m in r["models"] if m["key"] == key}


def call(app: FleetApp, method: str, path: str, **params: object) -> httpx.Response:
    """A management call with the session app's admin key."""
    return httpx.request(method, f"{app.url}{path}", params=params, headers=ADMIN, timeout=120)


@pytest.fixture
def small_fraud(fleet: dict[str, Manifest]) -> Manifest:
    """The smallest fraud model of the session fleet (tests unpin it when done)."""
    return min(
        (m for m in fleet.values() if m.model_id.startswith("fraud-")),
        key=lambda m: m.weight_bytes,
    )


def test_load_on_both_replicas_residency_and_cli(
    app: FleetApp, capsys: pytest.CaptureFixture
) -> None:
    model = fraud_ids()[11]
    loaded = call(app, "POST", f"/v1/models/{model}/load", replicas=2)
    assert loaded.status_code == 200, loaded.text
    assert {r["ok"] for r in loaded.json()["replicas"]} == {True}
    live = {r["replica"] for r in app.replicas()}
    assert set(holders(app, f"{model}@1")) == live
    assert len(live) == 2
    detail = call(app, "GET", f"/v1/models/{model}").json()
    residency = detail["residency"]
    assert {r["replica"] for r in residency} == live
    for r in residency:
        assert r["version"] == "1"
        assert r["bytes"] > 0
        assert r["device"] == "cpu"
        assert r["pool"] == "default"
        assert time.time() - 60 < r["loaded_at"] <= r["last_used"] <= time.time() + 1
    cli = ["--url", app.url, "--admin-key", ADMIN_KEY]
    assert main([*cli, "models"]) == 0
    table = capsys.readouterr().out
    row = next(line for line in table.splitlines() if line.startswith(model))
    assert all(replica[:8] in row for replica in live)
    assert main([*cli, "unload", model]) == 0
    assert "unload" in capsys.readouterr().out
    assert holders(app, f"{model}@1") == {}
    assert main([*cli, "load", model, "--replicas", "1"]) == 0
    assert len(holders(app, f"{model}@1")) == 1
    assert main([*cli, "load", "no-such-model"]) == 1
    assert "model_not_found" in capsys.readouterr().err


def test_unload_while_requests_are_in_flight(app: FleetApp) -> None:
    """Requests that hold the model when it is unloaded finish with correct answers."""
    texts = [
        f"{i}: " + "the delivery was late and the refund slower still " * 20 for i in range(48)
    ]
    assert app.predict("minilm-embed", texts[:1], version="1").status_code == 200
    want = expected("minilm-embed", texts)
    evictions = sum(r["evictions"] for r in app.replicas())

    def predict() -> tuple[float, float, httpx.Response]:
        sent = time.monotonic()
        response = app.predict("minilm-embed", texts, version="1")
        return sent, time.monotonic(), response

    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(predict) for _ in range(4)]

        def unload_catches_requests() -> tuple[float, float, httpx.Response] | None:
            # NOTE: an unload before the requests arrive just evicts an idle model (they
            # load it again); poll until one finds requests holding it.
            at = time.monotonic()
            response = call(app, "POST", "/v1/models/minilm-embed/unload", version="1")
            assert response.status_code == 200, response.text
            busy = any(r["in_flight"] > 0 for r in response.json()["replicas"])
            return (at, time.monotonic(), response) if busy else None

        unload_at, unloaded_at, unloaded = wait_for(
            unload_catches_requests, 30, "an unload with requests in flight", every_s=0.05
        )
        results = [f.result() for f in futures]
    assert sum(r["in_flight"] for r in unloaded.json()["replicas"]) >= 1
    for *_, response in results:
        assert response.status_code == 200, response.text
        assert_same("minilm-embed", response.json()["outputs"], want)
    assert any(sent < unload_at and done > unloaded_at for sent, done, _ in results)
    wait_for(
        lambda: sum(r["evictions"] for r in app.replicas()) > evictions,
        10,
        "the drained copy to be freed",
    )
    for replica in app.replicas():
        assert replica["resident_bytes"] <= BUDGET


def test_pin_survives_churn_and_oversized_pin_is_refused(
    app: FleetApp, fleet: dict[str, Manifest], small_fraud: Manifest
) -> None:
    key = small_fraud.key
    try:
        pinned = call(app, "PUT", f"/v1/models/{small_fraud.model_id}/pin")
        assert pinned.status_code == 200, pinned.text
        assert all(r["pinned"] and r["resident"] for r in pinned.json()["replicas"])
        evictions = sum(r["evictions"] for r in app.replicas())
        churn = [k for k in fleet if k != key and not k.startswith("text-clf")][:12]
        churn += ["minilm-embed@1", "minilm-embed@2"]
        for other in churn:
            model_id, _, version = other.partition("@")
            response = app.predict(model_id, inputs_for(model_id), version=version)
            assert response.status_code == 200, response.text
            held = holders(app, key)
            assert len(held) == 2, other
            assert all(m["pinned"] for m in held.values()), other
        assert sum(r["evictions"] for r in app.replicas()) > evictions
        body = app.predict(small_fraud.model_id, inputs_for(small_fraud.model_id)).json()
        assert body["resident"] is True
        # two 91 MB pins cannot share a 95 MB replica: refused, and rolled back
        first = call(app, "PUT", "/v1/models/minilm-embed/pin", version="1")
        assert first.status_code == 200, first.text
        refused = call(app, "PUT", "/v1/models/minilm-embed/pin", version="2")
        assert refused.status_code == 507, refused.text
        assert refused.json()["code"] == "pin_exceeds_budget"
        assert "budget" in refused.json()["error"]
        assert all(not m["pinned"] for m in holders(app, "minilm-embed@2").values())
        assert len(holders(app, "minilm-embed@1")) == 2
    finally:
        call(app, "DELETE", "/v1/models/minilm-embed/pin")
        call(app, "DELETE", f"/v1/models/{small_fraud.model_id}/pin")
    assert all(not r["pinned"] for r in app.replicas())


def test_killed_replica_drops_out_and_its_pins_come_back(
    app: FleetApp, small_fraud: Manifest
) -> None:
    import ray

    key = small_fraud.key
    try:
        assert call(app, "PUT", f"/v1/models/{small_fraud.model_id}/pin").status_code == 200
        before = app.replicas()
        victim = before[0]
        assert victim["actor_name"]
        assert key in victim["pinned"]
        ray.kill(ray.get_actor(victim["actor_name"], namespace=victim["namespace"]))
        killed_at = time.monotonic()
        wait_for(
            lambda: victim["replica"] not in {r["replica"] for r in app.replicas()},
            5,
            "the killed replica to leave /v1/replicas",
        )
        dropped_s = time.monotonic() - killed_at
        detail = call(app, "GET", f"/v1/models/{small_fraud.model_id}").json()
        assert victim["replica"] not in {r["replica"] for r in detail["residency"]}

        def replaced() -> bool:
            live = app.replicas()
            return len(live) == 2 and all(
                key in r["pinned"] and any(m["key"] == key for m in r["models"]) for r in live
            )

        wait_for(replaced, 120, "a new replica with the pin resident", every_s=0.5)
        back_s = time.monotonic() - killed_at
        # the app keeps answering
        response = app.predict(small_fraud.model_id, inputs_for(small_fraud.model_id))
        assert response.status_code == 200
    finally:
        call(app, "DELETE", f"/v1/models/{small_fraud.model_id}/pin")
    print(
        f"\nkilled replica gone from listings after {dropped_s:.2f}s; "
        f"replacement with the pin resident after {back_s:.1f}s"
    )


def test_admin_key_on_a_second_app(
    app: FleetApp, ray_cluster: dict, capsys: pytest.CaptureFixture
) -> None:
    """An app deployed with `ingress.management.admin_key`: management needs the key
    (HTTP, tritonclient, CLI); inference does not."""
    import tritonclient.http as triton
    from ray import serve
    from tritonclient.utils import InferenceServerException

    from deployments.builder import build_app
    from serve_app.config import AppConfig

    config = AppConfig.model_validate(
        {
            "store": app.config.store.model_dump(),
            "host": {**app.config.host.model_dump(), "num_replicas": 1},
            "ingress": {
                **app.config.ingress.model_dump(),
                "management": {"admin_key": "another-k3y-for-tests"},
            },
        }
    )
    serve.run(build_app(config), name="fleet-locked", route_prefix="/locked", blocking=False)
    url = f"{app.url}/locked"
    key = {"Authorization": "Bearer another-k3y-for-tests"}
    model = fraud_ids()[12]
    try:
        wait_for(
            lambda: (
                httpx.get(f"{url}/v1/replicas", headers=key, timeout=5).status_code == 200
                and len(httpx.get(f"{url}/v1/replicas", headers=key, timeout=5).json()) == 1
            ),
            180,
            "the locked app and its host replica",
            every_s=0.5,
        )
        denied = httpx.get(f"{url}/v1/replicas", timeout=30)
        assert (denied.status_code, denied.json()["code"]) == (401, "unauthorized")
        wrong = httpx.post(
            f"{url}/v1/models/{model}/load", headers={"Authorization": "Bearer no"}, timeout=30
        )
        assert wrong.status_code == 401
        assert httpx.get(f"{url}/v1/models/{model}", timeout=30).json()["residency"] is None
        client = triton.InferenceServerClient(url=url.removeprefix("http://"))
        with pytest.raises(InferenceServerException) as caught:
            client.load_model(model)
        assert caught.value.status() == "401"
        client.load_model(model, headers=key)
        residency = httpx.get(f"{url}/v1/models/{model}", headers=key, timeout=30).json()
        assert [r["version"] for r in residency["residency"]] == ["1"]
        assert main(["--url", url, "pin", model]) == 1
        assert "unauthorized" in capsys.readouterr().err
        assert main(["--url", url, "--admin-key", "another-k3y-for-tests", "pin", model]) == 0
        cli = ["--url", url, "--admin-key", "another-k3y-for-tests"]
        assert main([*cli, "pin", model, "--remove"]) == 0
        # inference needs no key
        assert (
            httpx.post(
                f"{url}/v1/models/{model}/predict", json={"inputs": inputs_for(model)}, timeout=60
            ).status_code
            == 200
        )
        client.close()
    finally:
        serve.delete("fleet-locked")


def test_management_switched_off_on_a_third_app(
    app: FleetApp, fleet: dict[str, Manifest], store: ModelStore
) -> None:
    """An app deployed with `ingress.management.enabled: false`: every management call is
    403 `management_disabled` (HTTP and the V2 repository extension), its hosts do not apply
    pins stored for it earlier; inference works."""
    import tritonclient.http as triton
    from ray import serve
    from tritonclient.utils import InferenceServerException

    from deployments.builder import build_app
    from deployments.replica_directory import read_replicas
    from serve_app.config import AppConfig
    from serve_app.management.pins import PinRecord, PinStore
    from serve_app.storage.state_store import StoreKeyValue

    stored = PinStore(StoreKeyValue.of(store), "fleet-off")
    stored.put(PinRecord(manifest=fleet[f"{fraud_ids()[14]}@1"]))  # from when it was on

    config = AppConfig.model_validate(
        {
            "store": app.config.store.model_dump(),
            "host": {**app.config.host.model_dump(), "num_replicas": 1},
            "ingress": {**app.config.ingress.model_dump(), "management": {"enabled": False}},
        }
    )
    serve.run(build_app(config), name="fleet-off", route_prefix="/off", blocking=False)
    url = f"{app.url}/off"
    model = fraud_ids()[13]
    try:
        wait_for(
            lambda: httpx.get(f"{url}/healthz", timeout=5).status_code == 200,
            180,
            "the app with management off",
            every_s=0.5,
        )
        calls = [
            ("GET", "/v1/replicas"),
            ("POST", f"/v1/models/{model}/load"),
            ("POST", f"/v1/models/{model}/unload"),
            ("PUT", f"/v1/models/{model}/pin"),
            ("DELETE", f"/v1/models/{model}/pin"),
            ("POST", "/v2/repository/index"),
        ]
        for method, path in calls:
            response = httpx.request(method, f"{url}{path}", timeout=30)
            assert response.status_code == 403, (method, path)
            assert response.json()["code"] == "management_disabled", (method, path)
        client = triton.InferenceServerClient(url=url.removeprefix("http://"))
        with pytest.raises(InferenceServerException) as caught:
            client.load_model(model)
        assert caught.value.status() == "403"
        client.close()
        assert httpx.get(f"{url}/v1/models/{model}", timeout=30).json()["residency"] is None
        response = httpx.post(
            f"{url}/v1/models/{model}/predict", json={"inputs": inputs_for(model)}, timeout=60
        )
        assert response.status_code == 200
        assert response.headers["X-Fleet-Cache"] == "miss"  # the refused load loaded nothing
        wait_for(lambda: read_replicas("fleet-off", "hosts"), 60, "its host's first report")
        deadline = (
            time.monotonic() + 3 * PIN_SYNC_S
        )  # NOTE: hosts sync pins at once, then every 2 s
        while time.monotonic() < deadline:
            (host,) = read_replicas("fleet-off", "hosts")
            assert host["pinned"] == [], "a host applied a stored pin with management off"
            time.sleep(0.2)
    finally:
        stored.delete(f"{fraud_ids()[14]}@1")
        serve.delete("fleet-off")
