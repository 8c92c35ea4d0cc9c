"""The HTTP API over a real host and an in-memory store: contract, errors, headers."""

from __future__ import annotations

import httpx
import pytest
import torch
from safetensors.torch import load_file

from serve_app.api.native import MODEL_ID_HEADER
from serve_app.loading.architectures import build_mlp
from serve_app.storage.store import CLAIM_NAME, ModelStore
from tests.support import SMALL

ROW = [0.1, -0.2, 0.3, 0.4]


def expected_scores(store: ModelStore, model_id: str, version: str, rows: list) -> list[float]:
    """Load the model directly with torch and score `rows`."""
    path = f"{store.version_dir(model_id, version)}/model.safetensors"
    module = build_mlp(SMALL)
    with store.fs.open(path, "rb") as fh:
        data = fh.read()
    from safetensors.torch import load

    module.load_state_dict(load(data))
    with torch.inference_mode():
        return torch.sigmoid(module(torch.tensor(rows))[:, 0]).tolist()


async def test_predict_latest_version_and_cache_header(
    client: httpx.AsyncClient, published: ModelStore
) -> None:
    first = await client.post("/v1/models/m-a/predict", json={"inputs": [ROW, ROW]})
    assert first.status_code == 200, first.text
    body = first.json()
    assert (body["model_id"], body["version"], body["resident"]) == ("m-a", "2", False)
    assert first.headers["X-Fleet-Cache"] == "miss"
    assert body["outputs"] == pytest.approx(expected_scores(published, "m-a", "2", [ROW, ROW]))
    second = await client.post("/v1/models/m-a/predict", json={"inputs": [ROW]})
    assert second.headers["X-Fleet-Cache"] == "hit"
    assert second.json()["resident"] is True


async def test_pinned_version_in_path_and_body(client: httpx.AsyncClient) -> None:
    by_path = await client.post("/v1/models/m-a/versions/1/predict", json={"inputs": [ROW]})
    by_body = await client.post("/v1/models/m-a/predict", json={"inputs": [ROW], "version": "1"})
    assert by_path.json()["version"] == by_body.json()["version"] == "1"
    assert by_path.json()["outputs"] == by_body.json()["outputs"]


async def test_predict_by_multiplex_header(client: httpx.AsyncClient) -> None:
    response = await client.post(
        "/v1/predict", json={"inputs": [ROW]}, headers={MODEL_ID_HEADER: "m-b"}
    )
    assert response.status_code == 200
    assert response.json()["model_id"] == "m-b"


def test_header_name_is_rays() -> None:
    from ray.serve._private.constants import SERVE_MULTIPLEXED_MODEL_ID

    assert MODEL_ID_HEADER == SERVE_MULTIPLEXED_MODEL_ID


async def test_listing_and_manifest(client: httpx.AsyncClient) -> None:
    listing = (await client.get("/v1/models")).json()
    assert [m["model_id"] for m in listing["models"]] == ["m-a", "m-b"]
    assert listing["models"][0]["versions"] == ["1", "2"]
    detail = (await client.get("/v1/models/m-a", params={"version": "1"})).json()
    assert detail["manifest"]["version"] == "1"
    assert detail["manifest"]["files"][0]["sha256"]
    assert (await client.get("/healthz")).json()["status"] == "ok"


@pytest.mark.parametrize(
    ("path", "body", "status", "code"),
    [
        ("/v1/models/nope/predict", {"inputs": [ROW]}, 404, "model_not_found"),
        ("/v1/models/m-a/versions/9/predict", {"inputs": [ROW]}, 404, "version_not_found"),
        ("/v1/models/%2e%2e/predict", {"inputs": [ROW]}, 400, "invalid_model_id"),
        ("/v1/models/" + "x" * 129 + "/predict", {"inputs": [ROW]}, 400, "invalid_model_id"),
        ("/v1/models/m-a/predict", {"inputs": []}, 400, "empty_inputs"),
        ("/v1/models/m-a/predict", {"inputs": [[1, 2]]}, 422, "invalid_input"),
        ("/v1/models/m-a/predict", {"inputs": [["a", "b", "c", "d"]]}, 422, "invalid_input"),
        ("/v1/models/m-a/predict", {"inputs": "text"}, 400, "malformed_body"),
        ("/v1/models/m-a/predict", {"rows": [ROW]}, 400, "malformed_body"),
    ],
)
async def test_errors(
    client: httpx.AsyncClient, path: str, body: object, status: int, code: str
) -> None:
    response = await client.post(path, json=body)
    assert response.status_code == status, response.text
    assert response.json()["code"] == code
    assert set(response.json()) == {"error", "code"}


async def test_malformed_json(client: httpx.AsyncClient) -> None:
    response = await client.post("/v1/models/m-a/predict", content=b"{not json")
    assert (response.status_code, response.json()["code"]) == (400, "malformed_body")


async def test_oversized_body(client: httpx.AsyncClient) -> None:
    rows = [ROW] * 5000  # > 64 KiB
    response = await client.post("/v1/models/m-a/predict", json={"inputs": rows})
    assert (response.status_code, response.json()["code"]) == (413, "payload_too_large")


async def test_unknown_route_is_json_404(client: httpx.AsyncClient) -> None:
    response = await client.get("/v2/nothing")
    assert response.status_code == 404
    assert response.json()["code"] == "not_found"


async def test_corrupt_artifact_is_502_and_not_cached(
    client: httpx.AsyncClient, published: ModelStore
) -> None:
    path = f"{published.version_dir('m-b', '1')}/model.safetensors"
    good = published.fs.cat_file(path)
    published.fs.pipe_file(path, good[:-4] + b"\0\0\0\0")
    response = await client.post("/v1/models/m-b/predict", json={"inputs": [ROW]})
    assert (response.status_code, response.json()["code"]) == (502, "artifact_corrupt")
    # other models keep serving
    assert (await client.post("/v1/models/m-a/predict", json={"inputs": [ROW]})).status_code == 200


async def test_docs_are_served(client: httpx.AsyncClient) -> None:
    spec = (await client.get("/openapi.json")).json()
    assert "/v1/models/{model_id}/predict" in spec["paths"]
    assert (await client.get("/docs")).status_code == 200


def test_safetensors_only(published: ModelStore) -> None:
    files = published.fs.find(published.root)
    assert all(f.endswith((".safetensors", ".json", f"/{CLAIM_NAME}")) for f in files)
    assert load_file  # weights are read with safetensors, never pickle
