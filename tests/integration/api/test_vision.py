"""Image classifiers on the real stack: tritonclient's binary BYTES and UINT8 requests,
the handle's `predict` with image bytes and `predict_table` with a binary `image` column,
hostile images through Ray (typed errors cross the actor boundary), and image models in
stats, metrics and `/v1/replicas`. Answers are compared with the models run directly."""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pyarrow as pa
import pytest
import tritonclient.http as triton
from PIL import Image

from devstack.vision_models import vision_specs, write_vision_model
from serve_app.storage.publisher import publish_path
from serve_app.storage.store import ModelStore
from tests.support import (
    FleetApp,
    bomb_png,
    claim_size,
    encoded_image,
    vision_reference,
    wait_for,
)

SPECS = vision_specs(3)[1:]  # a ConvNeXt and a ViT
IMAGES = [
    encoded_image(100, 60, "PNG", seed=1),
    encoded_image(37, 121, "JPEG", seed=2, quality=85),
    encoded_image(64, 64, "WEBP", seed=3),
]


@pytest.fixture(scope="module")
def vision(app: FleetApp, store: ModelStore, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The two image classifiers, published and listed: model id -> its folder."""
    root = tmp_path_factory.mktemp("vision")
    folders = {}
    for spec in SPECS:
        folders[spec.model_id] = write_vision_model(root / spec.model_id, spec, seed=5)
        if not store.exists(spec.model_id, "1"):
            publish_path(store, folders[spec.model_id], spec.model_id, "1")
    wait_for(
        lambda: all(
            httpx.get(f"{app.url}/v1/models/{m}", timeout=10).status_code == 200 for m in folders
        ),
        30,
        "the image models in the registry",
    )
    return folders


@pytest.fixture(scope="module")
def client(app: FleetApp) -> Iterator[triton.InferenceServerClient]:
    client = triton.InferenceServerClient(url=app.url.removeprefix("http://"))
    yield client
    client.close()


def top_labels(expected: list[dict[str, Any]]) -> list[str]:
    return [e["labels"][0] for e in expected]


def test_tritonclient_binary_bytes_and_uint8(
    client: triton.InferenceServerClient, vision: dict[str, Path]
) -> None:
    model_id = SPECS[1].model_id
    expected = vision_reference(vision[model_id], IMAGES)
    tensor = triton.InferInput("image", [len(IMAGES)], "BYTES")
    tensor.set_data_from_numpy(np.array(IMAGES, dtype=object), binary_data=True)
    result = client.infer(model_id, [tensor])
    assert [b.decode() for b in result.as_numpy("label")] == top_labels(expected)
    labels = result.as_numpy("labels")
    assert labels.shape == (len(IMAGES), 5)
    assert [[b.decode() for b in row] for row in labels] == [e["labels"] for e in expected]
    np.testing.assert_allclose(
        result.as_numpy("scores"), [e["scores"] for e in expected], atol=1e-5
    )
    # raw pixels: the same files decoded, as one UINT8 [N, H, W, 3] tensor
    same_size = [IMAGES[0], encoded_image(100, 60, "PNG", seed=8)]
    pixels = np.stack([np.asarray(Image.open(io.BytesIO(b)).convert("RGB")) for b in same_size])
    tensor = triton.InferInput("image", list(pixels.shape), "UINT8")
    tensor.set_data_from_numpy(pixels, binary_data=True)
    result = client.infer(model_id, [tensor], outputs=[triton.InferRequestedOutput("scores")])
    want = vision_reference(vision[model_id], same_size)
    np.testing.assert_allclose(result.as_numpy("scores"), [e["scores"] for e in want], atol=1e-5)


def test_handle_predict_and_predict_table(vision: dict[str, Path]) -> None:
    from ray import serve

    model_id = SPECS[0].model_id
    expected = vision_reference(vision[model_id], IMAGES)
    handle = serve.get_app_handle("fleet")
    result = handle.predict.remote(model_id, IMAGES).result(timeout_s=120)
    assert result["task"] == "image-classification"
    assert [o["label"] for o in result["outputs"]] == top_labels(expected)
    table = pa.table({"image": pa.array(IMAGES * 30, pa.binary())})
    scored = handle.predict_table.remote(model_id, table).result(timeout_s=120)
    assert scored.column("label").to_pylist() == top_labels(expected) * 30
    np.testing.assert_allclose(
        scored.column("score").to_pylist(), [e["scores"][0] for e in expected] * 30, atol=1e-5
    )


def test_hostile_images_over_http(app: FleetApp, vision: dict[str, Path]) -> None:
    model_id = SPECS[1].model_id

    def predict(data: bytes) -> httpx.Response:
        return app.predict(model_id, [base64.b64encode(data).decode()])

    bomb = predict(bomb_png(6400, 6400))  # refused at the ingress, from the header
    assert (bomb.status_code, bomb.json()["code"]) == (413, "image_too_large")
    # a PNG whose header claims half the rows it holds: only the host's decode sees it,
    # and its typed error crosses the actor boundary
    other_size = predict(claim_size(encoded_image(64, 64), 64, 32))
    assert (other_size.status_code, other_size.json()["code"]) == (422, "invalid_image")
    assert "claims 64x32 pixels" in other_size.json()["error"]
    truncated = predict(IMAGES[1][: len(IMAGES[1]) * 2 // 3])
    assert (truncated.status_code, truncated.json()["code"]) == (422, "invalid_image")
    assert predict(IMAGES[0]).status_code == 200


def test_image_models_in_stats_metrics_and_replicas(
    app: FleetApp, vision: dict[str, Path], ray_cluster: dict[str, Any]
) -> None:
    model_id = SPECS[0].model_id
    for _ in range(3):
        assert app.predict(model_id, [base64.b64encode(IMAGES[2]).decode()]).status_code == 200
    stats = wait_for(
        lambda: next(
            (
                m
                for m in httpx.get(f"{app.url}/v1/stats", timeout=30).json()["models"]
                if m["model_id"] == model_id and m["requests"] >= 3
            ),
            None,
        ),
        30,
        "the image model in /v1/stats",
    )
    assert stats["errors"] == 0
    keys = {m["key"] for r in app.replicas() for m in r["models"]}
    assert f"{model_id}@1" in keys
    metrics_url = f"http://127.0.0.1:{ray_cluster['metrics_export_port']}/metrics"
    wait_for(
        lambda: f'model="{model_id}"' in httpx.get(metrics_url, timeout=10).text,
        60,
        "the image model's metrics",
        every_s=1.0,
    )
