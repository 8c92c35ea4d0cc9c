"""Weights that do not match the manifest's architecture are a bad artifact: 502
`artifact_corrupt`, not a 500 (issue 15 item 3), through the real loader and the HTTP app,
with real safetensors files whose tensors have the wrong shapes."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest
import torch
from safetensors.torch import load_file, save_file

from devstack.demo_fleet import TEXT_CLASSIFIERS, write_fraud_model, write_text_classifier
from serve_app.errors import ArtifactCorrupt
from serve_app.gateway.gateway import Gateway
from serve_app.loading.disk_tier import DiskTier
from serve_app.loading.loader import ModelLoader
from serve_app.loading.tensorfile import tensors_from_buffer
from serve_app.storage.publisher import publish_path
from serve_app.storage.store import ModelStore
from tests.support import SMALL


def _mismatched_mlp(root: Path) -> Path:
    """A fraud model whose module.json declares 16 hidden units; its weights have 8."""
    src = write_fraud_model(root, 0, 1, SMALL)
    spec = json.loads((src / "module.json").read_text())
    spec["architecture"]["hidden_dims"] = [16]
    (src / "module.json").write_text(json.dumps(spec))
    return src


def _loader(store: ModelStore, tmp_path: Path) -> ModelLoader:
    return ModelLoader(store, DiskTier(tmp_path / "disk", 2**30), torch.device("cpu"))


def test_torch_module_weights_of_another_shape_are_artifact_corrupt(
    published: ModelStore, tmp_path: Path
) -> None:
    manifest = publish_path(published, _mismatched_mlp(tmp_path / "src"), "mismatch", "1")
    with pytest.raises(ArtifactCorrupt, match="architecture") as info:
        _loader(published, tmp_path).load(manifest)
    assert info.value.status_code == 502


def test_transformers_weights_of_another_shape_are_artifact_corrupt(
    published: ModelStore, tmp_path: Path
) -> None:
    spec = TEXT_CLASSIFIERS[0]
    src = write_text_classifier(tmp_path / "src", spec)
    weights = src / "model.safetensors"
    state = load_file(str(weights))
    name = next(k for k in state if k.endswith("word_embeddings.weight"))
    state[name] = state[name][: state[name].shape[0] // 2].contiguous()  # half the vocab
    save_file(state, str(weights))
    tensors_from_buffer(bytearray(weights.read_bytes()))  # still a well-formed file
    manifest = publish_path(published, src, "mismatch-text", "1")
    with pytest.raises(ArtifactCorrupt, match="config"):
        _loader(published, tmp_path).load(manifest)


async def test_http_answers_502_artifact_corrupt(
    published: ModelStore, gateway: Gateway, client: httpx.AsyncClient, tmp_path: Path
) -> None:
    publish_path(published, _mismatched_mlp(tmp_path / "src"), "mismatch", "1")
    gateway.registry.refresh()
    response = await client.post("/v1/models/mismatch/predict", json={"inputs": [[0.0] * 4]})
    assert response.status_code == 502, response.text
    assert response.json()["code"] == "artifact_corrupt"
