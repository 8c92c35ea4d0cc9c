"""The demo fleet's image classifiers: 60 by default, all three architectures, a few MB
each, and published with their processors as image-classification models."""

from __future__ import annotations

import uuid
from pathlib import Path

import fsspec

from devstack.demo_fleet import publish_demo_fleet
from devstack.vision_models import VISION_COUNT, vision_specs, write_vision_model
from serve_app.config import StoreConfig
from serve_app.storage.store import ModelStore


def test_sixty_specs_over_three_architectures() -> None:
    specs = vision_specs()
    assert len(specs) == VISION_COUNT == 60
    assert {s.arch for s in specs} == {"resnet", "convnext", "vit"}
    assert len({s.model_id for s in specs}) == 60


def test_largest_models_are_a_few_mb(tmp_path: Path) -> None:
    for spec in vision_specs(12)[-3:]:  # the widest of each architecture
        folder = write_vision_model(tmp_path / spec.model_id, spec, seed=1)
        size = (folder / "model.safetensors").stat().st_size
        assert 0.3e6 < size < 8e6, (spec, size)


def test_demo_fleet_publishes_image_classifiers() -> None:
    fs = fsspec.filesystem("memory", skip_instance_cache=True)
    store = ModelStore(StoreConfig(url=f"s3://fleet/d-{uuid.uuid4().hex[:8]}"), fs=fs)
    published = publish_demo_fleet(
        store, 1, progress=False, classifiers=(), include_embedder=False, vision=2
    )
    tasks = {m.model_id: m.task for m in published}
    assert tasks == {
        "fraud-merchant-0000": "tabular-classification",
        "vision-resnet-00": "image-classification",
        "vision-convnext-01": "image-classification",
    }
    vision = [m for m in published if m.task == "image-classification"]
    assert all("preprocessor_config.json" in {f.path for f in m.files} for m in vision)
