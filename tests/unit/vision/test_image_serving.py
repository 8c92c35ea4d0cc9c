"""Image classifiers end to end without Ray: real models published to an in-memory store,
a real `ModelHost`, the gateway and the HTTP app. Answers are compared with the same model
run directly through transformers (its own image processor) on the same bytes."""

from __future__ import annotations

import asyncio
import base64
import gzip
import io
import json
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import fsspec
import httpx
import numpy as np
import pyarrow as pa
import pytest
import torch
from PIL import Image
from transformers import AutoImageProcessor, AutoModelForImageClassification

from devstack.vision_models import LABELS, vision_specs, write_vision_model
from serve_app.api.app import create_app
from serve_app.config import BatchingConfig, HostConfig, IngressConfig, StoreConfig
from serve_app.gateway.gateway import Gateway
from serve_app.host.model_host import ModelHost
from serve_app.storage.publisher import publish_path
from serve_app.storage.registry import Registry
from serve_app.storage.store import ModelStore
from tests.support import MB, bomb_png, claim_size, encoded_image, vision_reference

SPECS = vision_specs(3)  # one ResNet, one ConvNeXt, one ViT
IMAGES = [
    encoded_image(100, 60, "PNG", seed=1),
    encoded_image(37, 121, "JPEG", seed=2, quality=85),
    encoded_image(64, 64, "WEBP", seed=3),
    encoded_image(20, 30, "PNG", "RGBA", seed=4),
]


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("vision")
    return {s.model_id: write_vision_model(root / s.model_id, s, seed=7) for s in SPECS}


@pytest.fixture
def store(folders: dict[str, Path]) -> ModelStore:
    fs = fsspec.filesystem("memory", skip_instance_cache=True)
    store = ModelStore(StoreConfig(url=f"s3://fleet/v-{uuid.uuid4().hex[:8]}"), fs=fs)
    for model_id, folder in folders.items():
        publish_path(store, folder, model_id, "1")
    return store


def make_host(store: ModelStore, tmp_path: Path, max_batch_size: int = 32) -> ModelHost:
    config = HostConfig(
        memory_budget=64 * MB,
        disk_cache_dir=str(tmp_path / "disk"),
        accelerator="cpu",
        batching=BatchingConfig(max_batch_size=max_batch_size),
    )
    return ModelHost(config, store, replica="unit")


@pytest.fixture
async def gateway(store: ModelStore, tmp_path: Path) -> AsyncIterator[Gateway]:
    host = make_host(store, tmp_path)
    registry = Registry(store, refresh_s=60)
    registry.refresh()
    yield Gateway(registry, host.predict, IngressConfig(max_batch_rows=64))
    await host.close()


@pytest.fixture
async def client(gateway: Gateway) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(gateway, max_body_bytes=8 * MB)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://fleet") as c:
        yield c


def assert_matches(outputs: list[dict], expected: list[dict]) -> None:
    assert len(outputs) == len(expected)
    for got, want in zip(outputs, expected, strict=True):
        assert list(got["scores"]) == want["labels"]
        np.testing.assert_allclose(list(got["scores"].values()), want["scores"], atol=1e-5)
        assert got["label"] == want["labels"][0]
        assert got["score"] == pytest.approx(want["scores"][0], abs=1e-5)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.arch)
async def test_native_predict_matches_transformers(
    client: httpx.AsyncClient, folders: dict[str, Path], spec: object
) -> None:
    model_id = spec.model_id  # type: ignore[attr-defined]
    response = await client.post(
        f"/v1/models/{model_id}/predict", json={"inputs": [b64(b) for b in IMAGES]}
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["task"] == "image-classification"
    assert_matches(body["outputs"], vision_reference(folders[model_id], IMAGES))


def v2_binary(datatype: str, shape: list[int], raw: bytes, **header: object) -> tuple:
    spec = {
        "name": "image",
        "datatype": datatype,
        "shape": shape,
        "parameters": {"binary_data_size": len(raw)},
    }
    head = json.dumps({"inputs": [spec], **header}).encode()
    return head + raw, len(head)


async def test_v2_bytes_binary_and_json_and_uint8(
    client: httpx.AsyncClient, folders: dict[str, Path]
) -> None:
    model_id = SPECS[2].model_id
    expected = vision_reference(folders[model_id], IMAGES)
    packed = b"".join(len(b).to_bytes(4, "little") + b for b in IMAGES)
    body, length = v2_binary("BYTES", [len(IMAGES)], packed)
    response = await client.post(
        f"/v2/models/{model_id}/infer",
        content=body,
        headers={"Inference-Header-Content-Length": str(length)},
    )
    assert response.status_code == 200, response.text
    outputs = {o["name"]: o for o in response.json()["outputs"]}
    assert outputs["label"]["data"] == [e["labels"][0] for e in expected]
    assert outputs["labels"]["shape"] == [len(IMAGES), 5]
    assert outputs["labels"]["data"] == [label for e in expected for label in e["labels"]]
    np.testing.assert_allclose(
        outputs["scores"]["data"], [s for e in expected for s in e["scores"]], atol=1e-5
    )
    as_json = {
        "inputs": [
            {
                "name": "image",
                "datatype": "BYTES",
                "shape": [2],
                "data": [b64(b) for b in IMAGES[:2]],
            }
        ]
    }
    response = await client.post(f"/v2/models/{model_id}/infer", json=as_json)
    assert response.status_code == 200, response.text
    assert response.json()["outputs"][0]["data"] == [e["labels"][0] for e in expected[:2]]
    # base64 text is read as such in binary data too; JSON text that is not base64 is a 400
    text = b64(IMAGES[0]).encode()
    body, length = v2_binary("BYTES", [1], len(text).to_bytes(4, "little") + text)
    response = await client.post(
        f"/v2/models/{model_id}/infer",
        content=body,
        headers={"Inference-Header-Content-Length": str(length)},
    )
    assert response.status_code == 200, response.text
    assert response.json()["outputs"][0]["data"] == [expected[0]["labels"][0]]
    as_json["inputs"][0]["data"] = ["not base64!", "x"]
    response = await client.post(f"/v2/models/{model_id}/infer", json=as_json)
    assert response.status_code == 400
    # raw pixels: the decoded RGB of the same files, as one UINT8 [N, H, W, 3] tensor
    same = [IMAGES[0], encoded_image(100, 60, "PNG", seed=11)]
    pixels = np.stack([np.asarray(Image.open(io.BytesIO(b)).convert("RGB")) for b in same])
    body, length = v2_binary("UINT8", list(pixels.shape), pixels.tobytes())
    response = await client.post(
        f"/v2/models/{model_id}/infer",
        content=body,
        headers={"Inference-Header-Content-Length": str(length)},
    )
    assert response.status_code == 200, response.text
    outputs = {o["name"]: o for o in response.json()["outputs"]}
    want = vision_reference(folders[model_id], same)
    np.testing.assert_allclose(
        outputs["scores"]["data"], [s for e in want for s in e["scores"]], atol=1e-5
    )
    meta = (await client.get(f"/v2/models/{model_id}")).json()
    assert meta["inputs"] == [{"name": "image", "datatype": "BYTES", "shape": [-1]}]
    assert [o["name"] for o in meta["outputs"]] == ["label", "score", "labels", "scores"]


HOSTILE = {
    "bomb": (bomb_png(6400, 6400), 413, "image_too_large"),
    "huge-claim": (claim_size(encoded_image(8, 8), 100_000, 100_000), 413, "image_too_large"),
    "claims-other-size": (claim_size(encoded_image(64, 64), 64, 32), 422, "invalid_image"),
    "truncated-jpeg": (encoded_image(64, 64, "JPEG")[:300], 422, "invalid_image"),
    "cmyk": (encoded_image(16, 16, "JPEG", "CMYK"), 422, "invalid_image"),
    "palette": (encoded_image(16, 16, "PNG", "P"), 422, "invalid_image"),
    "gif": (encoded_image(16, 16, "GIF"), 422, "invalid_image"),
}


async def test_hostile_images_get_typed_errors_and_serving_goes_on(
    client: httpx.AsyncClient,
) -> None:
    model_id = SPECS[0].model_id
    url = f"/v1/models/{model_id}/predict"
    good = client.post(url, json={"inputs": [b64(IMAGES[0])]})
    bad = [client.post(url, json={"inputs": [b64(data)]}) for data, *_ in HOSTILE.values()]
    responses = await asyncio.gather(good, *bad, client.post(url, json={"inputs": ["@@@"]}))
    assert responses[0].status_code == 200
    for (name, (_, status, code)), response in zip(HOSTILE.items(), responses[1:], strict=False):
        assert (response.status_code, response.json()["code"]) == (status, code), name
        assert "inputs[0]" in response.json()["error"], name
    assert responses[-1].status_code == 400
    # V2 binary too: the same typed errors
    data = HOSTILE["truncated-jpeg"][0]
    body, length = v2_binary("BYTES", [1], len(data).to_bytes(4, "little") + data)
    response = await client.post(
        f"/v2/models/{model_id}/infer",
        content=body,
        headers={"Inference-Header-Content-Length": str(length)},
    )
    assert response.status_code == 422
    again = await client.post(url, json={"inputs": [b64(IMAGES[1])]})
    assert again.status_code == 200


async def test_predict_table_reads_a_binary_image_column(
    gateway: Gateway, folders: dict[str, Path]
) -> None:
    model_id = SPECS[1].model_id
    images = IMAGES * 20  # more than one chunk of IMAGE_TABLE_CHUNK
    table = pa.table({"id": list(range(len(images))), "image": pa.array(images, pa.binary())})
    scored = await gateway.predict_table(model_id, table)
    assert scored.column_names == ["id", "image", "label", "score"]
    expected = vision_reference(folders[model_id], IMAGES) * 20
    assert scored.column("label").to_pylist() == [e["labels"][0] for e in expected]
    np.testing.assert_allclose(
        scored.column("score").to_pylist(), [e["scores"][0] for e in expected], atol=1e-5
    )


async def test_concurrent_requests_share_forward_passes(
    store: ModelStore, tmp_path: Path, folders: dict[str, Path]
) -> None:
    host = make_host(store, tmp_path)
    registry = Registry(store, refresh_s=60)
    registry.refresh()
    gateway = Gateway(registry, host.predict, IngressConfig())
    model_id = SPECS[2].model_id
    try:
        await gateway.predict(model_id, [IMAGES[0]])  # load it
        before = (host.batcher.stats.batches, host.batcher.stats.items)
        results = await asyncio.gather(
            *(gateway.predict(model_id, [IMAGES[i % len(IMAGES)]]) for i in range(24))
        )
        batches = host.batcher.stats.batches - before[0]
        assert host.batcher.stats.items - before[1] == 24  # all went through the batcher
        assert batches < 24, "every request ran its own forward pass"
        assert host.batcher.stats.largest_batch > 1
        expected = vision_reference(folders[model_id], IMAGES)
        for i, result in enumerate(results):
            assert_matches(result.outputs, [expected[i % len(IMAGES)]])
    finally:
        await host.close()


def test_publishing_needs_a_servable_image_processor(
    folders: dict[str, Path], tmp_path: Path
) -> None:
    import shutil

    from serve_app.errors import BadRequest
    from serve_app.storage.publisher import build_manifest

    folder = shutil.copytree(folders[SPECS[0].model_id], tmp_path / "m")
    manifest = build_manifest(folder, "m", "1")
    assert (manifest.task, manifest.task_options) == ("image-classification", {"top_k": 5})
    assert manifest.labels == list(LABELS)
    config = folder / "preprocessor_config.json"
    config.write_text(json.dumps({"image_processor_type": "CLIPImageProcessor"}))
    with pytest.raises(BadRequest, match="not supported"):
        build_manifest(folder, "m", "1")
    config.unlink()
    with pytest.raises(BadRequest, match=r"preprocessor_config\.json"):
        build_manifest(folder, "m", "1")


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.arch)
def test_loaded_without_random_init(
    store: ModelStore,
    tmp_path: Path,
    folders: dict[str, Path],
    spec: object,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The loader builds the module on the meta device and adopts the weights: every
    `torch.nn.init` call during a load touches only meta tensors, and the parameters are
    exactly the published ones."""
    from safetensors.torch import load_file

    from serve_app.loading.disk_tier import DiskTier
    from serve_app.loading.loader import ModelLoader

    devices: list[str] = []
    for name in ("normal_", "trunc_normal_", "uniform_", "kaiming_uniform_", "zeros_", "ones_"):
        original = getattr(torch.nn.init, name)

        def traced(*args: object, _original: object = original, **kwargs: object) -> object:
            tensor = args[0] if args else kwargs["tensor"]
            devices.append(str(tensor.device))  # type: ignore[attr-defined]
            return _original(*args, **kwargs)  # type: ignore[operator]

        monkeypatch.setattr(torch.nn.init, name, traced)
    model_id = spec.model_id  # type: ignore[attr-defined]
    loader = ModelLoader(store, DiskTier(tmp_path / "disk", 64 * MB), torch.device("cpu"))
    registry = Registry(store, refresh_s=60)
    registry.refresh()
    predictor = loader.load(registry.resolve(model_id, None))
    assert devices, "no init call traced: the check would prove nothing"
    assert set(devices) == {"meta"}
    # NOTE: transformers renames some checkpoint keys on load (ViT's attention), so the
    # tensors are matched by value: each of the module's is one of the published ones.
    published = list(load_file(str(folders[model_id] / "model.safetensors")).values())
    state = predictor.module.state_dict()  # type: ignore[union-attr]
    assert len(state) == len(published)
    for name, tensor in state.items():
        assert any(p.shape == tensor.shape and torch.equal(p, tensor) for p in published), (
            f"{name} is not a published tensor"
        )


def reference_features(folder: Path, images: list[bytes]) -> np.ndarray:
    """What the head of the classifier at `folder` sees, computed through transformers'
    own base models, L2-normalised."""
    processor = AutoImageProcessor.from_pretrained(str(folder))
    model = AutoModelForImageClassification.from_pretrained(str(folder)).eval()
    pil = [Image.open(io.BytesIO(b)) for b in images]
    pixels = processor(pil, do_convert_rgb=True, return_tensors="pt")["pixel_values"]
    with torch.inference_mode():
        if model.config.model_type == "vit":
            features = model.vit(pixel_values=pixels).last_hidden_state[:, 0]
        else:
            base = getattr(model, model.config.model_type)
            features = base(pixel_values=pixels).pooler_output.flatten(1)
    return torch.nn.functional.normalize(features, dim=1).numpy()


async def test_image_embedding_is_the_classifier_heads_input(
    store: ModelStore, gateway: Gateway, client: httpx.AsyncClient, folders: dict[str, Path]
) -> None:
    for spec in SPECS:
        publish_path(
            store, folders[spec.model_id], f"embed-{spec.arch}", "1", task="image-embedding"
        )
    gateway.registry.refresh()
    for spec in SPECS:
        model_id = f"embed-{spec.arch}"
        response = await client.post(
            f"/v1/models/{model_id}/predict", json={"inputs": [b64(b) for b in IMAGES]}
        )
        assert response.status_code == 200, response.text
        vectors = np.asarray(response.json()["outputs"])
        want = reference_features(folders[spec.model_id], IMAGES)
        assert vectors.shape == want.shape
        np.testing.assert_allclose(vectors, want, atol=1e-5)
    meta = (await client.get("/v2/models/embed-vit")).json()
    assert meta["outputs"] == [{"name": "embedding", "datatype": "FP32", "shape": [-1, -1]}]
    table = pa.table({"image": pa.array(IMAGES, pa.binary())})
    scored = await gateway.predict_table("embed-resnet", table)
    np.testing.assert_allclose(
        np.asarray(scored.column("embedding").to_pylist()),
        reference_features(folders[SPECS[0].model_id], IMAGES),
        atol=1e-5,
    )


async def test_top_k_set_at_publish(
    store: ModelStore, gateway: Gateway, client: httpx.AsyncClient, folders: dict[str, Path]
) -> None:
    from serve_app.errors import BadRequest

    folder = folders[SPECS[2].model_id]
    publish_path(store, folder, "top3", "1", top_k=3)
    with pytest.raises(BadRequest, match="top_k"):
        publish_path(store, folder, "top0", "1", top_k=0)
    gateway.registry.refresh()
    response = await client.post("/v1/models/top3/predict", json={"inputs": [b64(IMAGES[0])]})
    assert response.status_code == 200, response.text
    want = vision_reference(folder, IMAGES[:1], k=3)[0]
    assert list(response.json()["outputs"][0]["scores"]) == want["labels"]
    meta = (await client.get("/v2/models/top3")).json()
    assert meta["outputs"][2] == {"name": "labels", "datatype": "BYTES", "shape": [-1, 3]}


async def test_a_bytes_gzip_bomb_is_refused_on_its_shape_for_image_models(
    client: httpx.AsyncClient,
) -> None:
    """Image models accept raw UINT8 tensors of up to one largest image, but a BYTES
    tensor (one encoded file per element, walked one by one) stays within the rows limit:
    ~8 KB of gzip inflating to 2M empty elements is refused on its shape, unwalked."""
    count = (8 * MB - 200) // 4
    body, length = v2_binary("BYTES", [count], bytes(count * 4))
    packed = gzip.compress(body, 9)
    assert len(packed) < 10_000
    started = time.process_time()
    response = await client.post(
        f"/v2/models/{SPECS[0].model_id}/infer",
        content=packed,
        headers={"Content-Encoding": "gzip", "Inference-Header-Content-Length": str(length)},
    )
    assert response.status_code == 400, response.text
    assert "BYTES elements allowed for one tensor of this model" in response.json()["error"]
    assert time.process_time() - started < 0.5  # the walk alone would take ~3 s
