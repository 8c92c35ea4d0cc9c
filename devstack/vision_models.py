"""The demo fleet's image classifiers, generated offline and deterministically (seeded).

`vision-<arch>-NN`: random-init ResNet, ConvNeXt and ViT classifiers of ~0.5 to ~5 MB over
64 px inputs, each saved with its image processor (`preprocessor_config.json`: ViT's fixed
resize, or ConvNeXt's shortest-edge resize + centre crop, which ResNet checkpoints use too)
and ten labels. Sixty of them by default, so a replica's budget holds only part of them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

VISION_COUNT = 60
ARCHES = ("resnet", "convnext", "vit")
LABELS = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)
_WIDTHS = {"resnet": (16, 24, 32), "convnext": (16, 24, 32)}
_VIT = ((64, 2), (96, 2), (128, 3), (160, 3))


@dataclass(frozen=True)
class VisionSpec:
    """One demo image classifier: architecture, width (and ViT depth), input size."""

    model_id: str
    arch: str
    width: int
    layers: int = 1
    image_size: int = 64


def vision_specs(count: int = VISION_COUNT) -> list[VisionSpec]:
    """The first `count` demo image classifiers, architectures taking turns."""
    specs = []
    for i in range(count):
        arch = ARCHES[i % len(ARCHES)]
        n = i // len(ARCHES)
        model_id = f"vision-{arch}-{i:02d}"
        if arch == "vit":
            hidden, layers = _VIT[n % len(_VIT)]
            specs.append(VisionSpec(model_id, arch, hidden, layers))
        else:
            widths = _WIDTHS[arch]
            specs.append(VisionSpec(model_id, arch, widths[n % len(widths)]))
    return specs


def write_vision_model(dest: Path, spec: VisionSpec, seed: int) -> Path:
    """Write a random-init image classifier and its processor config into `dest`."""
    import torch
    from transformers import (
        ConvNextConfig,
        ConvNextForImageClassification,
        ConvNextImageProcessor,
        ResNetConfig,
        ResNetForImageClassification,
        ViTConfig,
        ViTForImageClassification,
        ViTImageProcessor,
    )

    labels = {
        "num_labels": len(LABELS),
        "id2label": dict(enumerate(LABELS)),
        "label2id": {label: i for i, label in enumerate(LABELS)},
    }
    w = spec.width
    torch.manual_seed(seed + sum(map(ord, spec.model_id)))
    if spec.arch == "vit":
        model = ViTForImageClassification(
            ViTConfig(
                hidden_size=w,
                num_hidden_layers=spec.layers,
                num_attention_heads=max(1, w // 32),
                intermediate_size=4 * w,
                image_size=spec.image_size,
                patch_size=8,
                **labels,
            )
        )
        processor = ViTImageProcessor(size={"height": spec.image_size, "width": spec.image_size})
    elif spec.arch == "resnet":
        model = ResNetForImageClassification(
            ResNetConfig(
                embedding_size=w,
                hidden_sizes=[w, 2 * w, 4 * w, 8 * w],
                depths=[1, 1, 1, 1],
                layer_type="basic",
                **labels,
            )
        )
        processor = ConvNextImageProcessor(
            size={"shortest_edge": spec.image_size},
            image_mean=[0.485, 0.456, 0.406],
            image_std=[0.229, 0.224, 0.225],
        )
    else:
        model = ConvNextForImageClassification(
            ConvNextConfig(hidden_sizes=[w, 2 * w, 4 * w, 8 * w], depths=[1, 1, 2, 1], **labels)
        )
        processor = ConvNextImageProcessor(size={"shortest_edge": spec.image_size})
    model.eval().save_pretrained(str(dest))
    processor.save_pretrained(str(dest))
    return dest
