"""Bad input and faults against the real stack: each gets its status and a JSON error,
the server keeps serving other models, and nothing is cached from a failed load."""

from __future__ import annotations

import http.client
import json
import time
from urllib.parse import urlparse

import httpx
import pytest

from devstack.seaweed import SeaweedServer
from serve_app.api.app import MODEL_ID_HEADER
from serve_app.loading.architectures import MlpSpec
from serve_app.storage.store import ModelStore
from tests.integration.reference import inputs_for
from tests.support import FleetApp, fraud_ids, wait_for

GOOD = fraud_ids()[1]


def assert_error(response: httpx.Response, status: int, code: str) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error", "code"}
    assert body["code"] == code
    assert "Traceback" not in body["error"]
    return body


def assert_still_serving(app: FleetApp) -> None:
    assert app.predict(GOOD, inputs_for(GOOD)).status_code == 200


def raw_post(app: FleetApp, path: str, body: bytes) -> tuple[int, dict]:
    """POST with the path sent exactly as given (no client-side normalisation)."""
    url = urlparse(app.url)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=30)
    conn.request("POST", path, body=body, headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    data = json.loads(response.read())
    conn.close()
    return response.status, data


@pytest.mark.parametrize(
    "path",
    [
        "/v1/models/../x/predict",
        "/v1/models/%2e%2e/predict",
        "/v1/models/..%2Fx/predict",
        "/v1/models/" + "m" * 129 + "/predict",
    ],
)
def test_invalid_model_id_in_path(app: FleetApp, path: str) -> None:
    status, body = raw_post(app, path, b'{"inputs": [[1.0]]}')
    assert (status, body["code"]) == (400, "invalid_model_id"), body
    assert_still_serving(app)


def test_invalid_model_id_in_header(app: FleetApp) -> None:
    response = httpx.post(
        f"{app.url}/v1/predict", json={"inputs": [[1.0]]}, headers={MODEL_ID_HEADER: "../x"}
    )
    assert_error(response, 400, "invalid_model_id")
    assert_still_serving(app)


def test_unknown_model(app: FleetApp) -> None:
    assert_error(app.predict("no-such-model", [[1.0]]), 404, "model_not_found")
    assert_still_serving(app)


def test_unknown_version(app: FleetApp) -> None:
    assert_error(app.predict(GOOD, inputs_for(GOOD), version="99"), 404, "version_not_found")
    assert_still_serving(app)


def test_malformed_json(app: FleetApp) -> None:
    response = httpx.post(f"{app.url}/v1/models/{GOOD}/predict", content=b'{"inputs": [1,')
    assert_error(response, 400, "malformed_body")
    assert_still_serving(app)


def test_wrong_input_shape(app: FleetApp) -> None:
    assert_error(app.predict(GOOD, [[0.5, 0.5, 0.5]]), 422, "invalid_input")
    assert_still_serving(app)


def test_wrong_input_type(app: FleetApp) -> None:
    assert_error(app.predict("minilm-embed", [[0.1, 0.2]]), 422, "invalid_input")
    assert_error(app.predict(GOOD, ["not", "numbers"]), 422, "invalid_input")
    assert_still_serving(app)


def test_empty_inputs(app: FleetApp) -> None:
    assert_error(app.predict(GOOD, []), 400, "empty_inputs")
    assert_still_serving(app)


def test_oversized_body(app: FleetApp) -> None:
    rows = [[0.123456789] * 32] * 2000  # ~700 KB > the test app's 256 KiB limit
    assert_error(app.predict(GOOD, rows), 413, "payload_too_large")
    assert_still_serving(app)


def test_model_larger_than_budget(app: FleetApp, store: ModelStore, tmp_path) -> None:
    from devstack.demo_fleet import write_fraud_model
    from serve_app.storage.publisher import publish_path

    width = 5200  # 2 x 5200^2 floats ~ 216 MB > the 95 MB budget
    spec = MlpSpec(input_dim=32, hidden_dims=[width, width], output_dim=1)
    src = write_fraud_model(tmp_path / "huge", 0, spec=spec)
    publish_path(store, src, "huge-model", "1")
    wait_for(lambda: app.predict("huge-model", inputs_for(GOOD)).status_code != 404, 30, "huge")
    body = assert_error(app.predict("huge-model", inputs_for(GOOD)), 507, "model_too_large")
    assert "budget" in body["error"]
    assert_still_serving(app)
    assert all("huge-model@1" not in {m["key"] for m in r["models"]} for r in app.replicas())


def test_corrupt_artifact(app: FleetApp, store: ModelStore, tmp_path) -> None:
    from devstack.demo_fleet import write_fraud_model
    from serve_app.storage.publisher import publish_path

    src = write_fraud_model(tmp_path / "corrupt", 5)
    manifest = publish_path(store, src, "corrupt-model", "1")
    path = f"{store.version_dir('corrupt-model', '1')}/model.safetensors"
    data = bytearray(store.fs.cat_file(path))
    data[-1] ^= 0xFF
    store.fs.pipe_file(path, bytes(data))
    wait_for(lambda: app.predict("corrupt-model", [[0.0] * 32]).status_code != 404, 30, "model")
    body = assert_error(app.predict("corrupt-model", [[0.0] * 32]), 502, "artifact_corrupt")
    assert "sha256" in body["error"]
    assert_still_serving(app)
    assert all(manifest.key not in {m["key"] for m in r["models"]} for r in app.replicas())


def test_storage_unreachable(app: FleetApp, s3: SeaweedServer, store: ModelStore, tmp_path) -> None:
    from devstack.demo_fleet import write_fraud_model
    from serve_app.storage.publisher import publish_path

    resident = fraud_ids()[2]
    assert app.predict(resident, inputs_for(resident)).status_code == 200
    # a model the registry knows but no replica has ever fetched (not on any disk tier)
    cold = "outage-model"
    publish_path(store, write_fraud_model(tmp_path / cold, 11), cold, "1")
    wait_for(
        lambda: httpx.get(f"{app.url}/v1/models/{cold}", timeout=30).status_code == 200,
        30,
        "the registry to list the new model",
    )
    s3.stop()
    try:
        response = app.predict(cold, inputs_for(GOOD))
        assert_error(response, 503, "storage_unavailable")
        assert int(response.headers["Retry-After"]) >= 1
        # resident models and the registry keep serving while S3 is down
        assert app.predict(resident, inputs_for(resident)).status_code == 200
        assert httpx.get(f"{app.url}/v1/models", timeout=30).status_code == 200
        assert all(f"{cold}@1" not in {m["key"] for m in r["models"]} for r in app.replicas())
    finally:
        s3.start()
        s3.wait_ready(timeout_s=60)
    started = time.monotonic()
    wait_for(
        lambda: app.predict(cold, inputs_for(GOOD)).status_code == 200,
        60,
        "recovery after S3 came back",
        every_s=0.5,
    )
    print(f"\nrecovered {time.monotonic() - started:.1f}s after S3 came back")
