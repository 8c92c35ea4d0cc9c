"""A vision model's own preprocessing (resize, crop, rescale, normalise), from its
`preprocessor_config.json`, without transformers' processor classes or torchvision.

`ImageProcessing.from_config()` reads the settings of the two processor kinds the fleet
serves: `ViTImageProcessor` (resize to a fixed height x width) and `ConvNextImageProcessor`
(also used by ResNet checkpoints: below 384 px, resize the shortest edge to
`shortest_edge / crop_pct`, then centre-crop a square). `pixel_values()` turns a batch of
RGB images into the model's input: each image is resized and cropped with Pillow (the same
calls, in the same order, as transformers' PIL backend, so the pixels are identical), then
the whole batch is rescaled, normalised and made channels-first in one vectorised step.
Unit tests compare the result with transformers' own processor on the same images.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from serve_app.errors import ModelLoadFailed

PROCESSOR_FILE = "preprocessor_config.json"
IMAGENET_STANDARD = (0.5, 0.5, 0.5)
# NOTE: per kind, transformers' class defaults for settings a saved config may leave out.
_DEFAULTS: dict[str, dict[str, Any]] = {
    "ViTImageProcessor": {"resample": 2, "size": {"height": 224, "width": 224}},
    "ConvNextImageProcessor": {
        "resample": 3,
        "size": {"shortest_edge": 384},
        "crop_pct": 224 / 256,
    },
}
_SUFFIXES = ("Pil", "Fast")
MAX_SIDE = 4096
DEFAULT_TOP_K = 5  # labels an image classifier answers with, unless task_options.top_k says


class ImageProcessing(BaseModel):
    """The preprocessing settings of one vision model (see module docstring)."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    kind: str
    do_resize: bool = True
    size: dict[str, int] = Field(default_factory=dict)
    resample: int = Field(2, ge=0, le=5)
    crop_pct: float | None = Field(None, gt=0, le=1)
    do_center_crop: bool = False
    crop_size: dict[str, int] | None = None
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    image_mean: tuple[float, float, float] = IMAGENET_STANDARD
    image_std: tuple[float, float, float] = IMAGENET_STANDARD

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> ImageProcessing:
        """Settings from a `preprocessor_config.json` object.

        Raises:
            ValueError: an unknown processor kind, or settings that do not give every image
                the same size (the batch could not be stacked).
        """
        name = str(config.get("image_processor_type") or "")
        kind = next((name[: -len(s)] for s in _SUFFIXES if name.endswith(s)), name)
        if kind not in _DEFAULTS:
            raise ValueError(
                f"image processor {name!r} is not supported; supported: {', '.join(_DEFAULTS)}"
            )
        settings = {**_DEFAULTS[kind], **{k: v for k, v in config.items() if v is not None}}
        # NOTE: older configs give sizes as one int: square for ViT and crops (transformers'
        # default_to_square), the shortest edge for ConvNeXt.
        if isinstance(settings.get("size"), int):
            side = settings["size"]
            square = kind != "ConvNextImageProcessor"
            settings["size"] = (
                {"height": side, "width": side} if square else {"shortest_edge": side}
            )
        if isinstance(settings.get("crop_size"), int):
            settings["crop_size"] = {
                "height": settings["crop_size"],
                "width": settings["crop_size"],
            }
        try:
            processing = cls.model_validate({**settings, "kind": kind})
        except ValidationError as exc:
            raise ValueError(f"invalid {name} settings: {exc.error_count()} error(s)") from exc
        processing.output_size()  # NOTE: fails now, not on the first request
        return processing

    @classmethod
    def from_folder(cls, folder: Path, key: str) -> ImageProcessing:
        """Settings from `folder`'s `preprocessor_config.json`.

        Raises:
            ModelLoadFailed: the file is missing, not JSON or not a supported processor.
        """
        try:
            config = json.loads((folder / PROCESSOR_FILE).read_text())
            if not isinstance(config, dict):
                raise ValueError(f"{PROCESSOR_FILE} is not a JSON object")
            return cls.from_config(config)
        except (OSError, ValueError) as exc:
            raise ModelLoadFailed(f"{key}: no usable {PROCESSOR_FILE} ({exc})") from exc

    def output_size(self) -> tuple[int, int]:
        """(height, width) of every preprocessed image.

        Raises:
            ValueError: the settings leave the size to the input image.
        """
        size = self._resized_fixed()
        if self.do_center_crop:
            crop = self.crop_size or {}
            if not ({"height", "width"} <= crop.keys()):
                raise ValueError("do_center_crop needs crop_size with height and width")
            wanted = (crop["height"], crop["width"])
            if size is not None and (wanted[0] > size[0] or wanted[1] > size[1]):
                raise ValueError(f"crop_size {wanted} is larger than the resized image {size}")
            if size is None and not self._short_edge_at_least(max(wanted)):
                raise ValueError("do_center_crop after a resize that may leave it too small")
            size = wanted
        if size is None:
            raise ValueError("these settings do not give every image the same size")
        if not (0 < size[0] <= MAX_SIDE and 0 < size[1] <= MAX_SIDE):
            raise ValueError(f"output size {size} is outside 1..{MAX_SIDE}")
        return size

    def _resized_fixed(self) -> tuple[int, int] | None:
        if not self.do_resize:
            return None
        if {"height", "width"} <= self.size.keys():
            return (self.size["height"], self.size["width"])
        edge = self.size.get("shortest_edge")
        if edge is None:
            raise ValueError(f"unsupported size setting {self.size}")
        if self.kind == "ConvNextImageProcessor":
            return (edge, edge)  # warped, or cropped to a square (see module docstring)
        return None

    def _short_edge_at_least(self, side: int) -> bool:
        edge = self.size.get("shortest_edge") if self.do_resize else None
        return edge is not None and edge >= side

    # ------------------------------------------------------------------ pixels
    def pixel_values(self, images: Iterable[Image.Image]) -> np.ndarray:
        """The model input for RGB images: float32 `[N, 3, H, W]`.

        `images` may be a generator: each image is resized as it comes, so a batch never
        holds more than one full-size decoded image at a time."""
        batch = np.stack([np.asarray(self._geometry(image)) for image in images])
        if self.do_rescale:
            # NOTE: in float64, then float32: transformers' rescale, bit for bit.
            values = (batch.astype(np.float64) * self.rescale_factor).astype(np.float32)
        else:
            values = batch.astype(np.float32)
        if self.do_normalize:
            mean = np.asarray(self.image_mean, dtype=np.float32)
            std = np.asarray(self.image_std, dtype=np.float32)
            values = (values - mean) / std
        return np.ascontiguousarray(values.transpose(0, 3, 1, 2))

    def _geometry(self, image: Image.Image) -> Image.Image:
        """Resize and crop one image (Pillow, per image: sizes differ before this step)."""
        if self.do_resize:
            image = self._resize(image)
        if self.do_center_crop and self.crop_size:
            image = _center_crop(image, self.crop_size["height"], self.crop_size["width"])
        return image

    def _resize(self, image: Image.Image) -> Image.Image:
        if {"height", "width"} <= self.size.keys():
            return image.resize((self.size["width"], self.size["height"]), self.resample)
        edge = self.size["shortest_edge"]
        if self.kind == "ConvNextImageProcessor":
            if edge >= 384:
                return image.resize((edge, edge), self.resample)
            crop_pct = self.crop_pct if self.crop_pct is not None else 224 / 256
            height, width = _shortest_edge_size(image, int(edge / crop_pct))
            image = image.resize((width, height), self.resample)
            return _center_crop(image, edge, edge)
        height, width = _shortest_edge_size(image, edge)
        return image.resize((width, height), self.resample)


def _shortest_edge_size(image: Image.Image, edge: int) -> tuple[int, int]:
    """(height, width) with the shorter side at `edge`, as transformers rounds it."""
    width, height = image.size
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = edge, int(edge * long / short)
    return (new_long, new_short) if width <= height else (new_short, new_long)


def _center_crop(image: Image.Image, height: int, width: int) -> Image.Image:
    """transformers' centre crop (top and left rounded down) of an image at least that big."""
    top = (image.height - height) // 2
    left = (image.width - width) // 2
    return image.crop((left, top, left + width, top + height))
